#!/bin/bash
# Run the whole test suite in a privileged container. What the tests need
# from the host, and why:
#   --privileged            load eBPF programs (CAP_BPF, CAP_NET_ADMIN,
#                           CAP_SYS_ADMIN), create network namespaces,
#                           cgroups and users, set login UIDs
#   --cap-add AUDIT_CONTROL pam_loginuid overwrites a set login UID
#                           (--privileged includes it; kept explicit)
#   --cgroupns host and /sys/fs/cgroup
#                           the tests attach to cgroups they create under
#                           the host's cgroup v2 hierarchy
#   /sys/fs/bpf             bpffs for the pins (mounted by the tests if
#                           absent, but sharing the host's is simpler)
#   kernel headers          none needed from the host: scripts/setup.sh
#                           links Debian's inside the container (every
#                           kernel-internal offset comes from BTF)
# Usage: packaging/container/run-tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
ENGINE=${ENGINE:-docker}
IMAGE=${IMAGE:-aus-tests}
"$ENGINE" build -t "$IMAGE" -f packaging/container/Dockerfile .
mounts=(-v /sys/fs/cgroup:/sys/fs/cgroup:rw -v /sys/fs/bpf:/sys/fs/bpf:rw)
exec "$ENGINE" run --rm --privileged --cap-add AUDIT_CONTROL --cgroupns host \
    "${mounts[@]}" "$IMAGE" bash scripts/test.sh -v "$@"
