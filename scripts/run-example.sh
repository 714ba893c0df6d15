#!/bin/bash
# Set up everything (scripts/setup.sh) and run ausd in the foreground with
# the shipped example policy, enforcing on this machine's cgroup2 root.
# Stop it with Ctrl-C: enforcement stays pinned in the kernel; remove it with
#   .venv/bin/ausctl --config /etc/aus/ausd.yaml uninstall --yes
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "run-example.sh: ausd needs root; run: sudo $0" >&2
    exit 2
fi
bash scripts/setup.sh
mkdir -p /etc/aus
[ -e /etc/aus/policy.yaml ] || cp packaging/policy.example.yaml /etc/aus/policy.yaml
[ -e /etc/aus/ausd.yaml ] || cp packaging/ausd.yaml /etc/aus/ausd.yaml
echo "run-example: policy /etc/aus/policy.yaml, config /etc/aus/ausd.yaml"
exec .venv/bin/ausd --config /etc/aus/ausd.yaml
