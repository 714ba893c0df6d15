#!/bin/bash
# Set up everything aus needs on Debian 12, idempotently: packages, kernel
# headers for bcc, bpffs, and a virtualenv (.venv) that sees Debian's bcc.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3-bpfcc bpftool linux-headers-amd64 python3-venv python3-pip
              iproute2 iputils-ping nftables passwd procps python3-libsss-nss-idmap)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/build. When the running
# kernel ships no headers, link the newest Debian header tree (the programs
# take every kernel-internal offset from BTF, so only UAPI layouts matter).
KDIR=/lib/modules/$(uname -r)
if [ ! -e "$KDIR/build/include" ]; then
    arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
    common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)
    if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
        echo "setup: no kernel headers under /usr/src; install linux-headers-amd64" >&2
        exit 1
    fi
    mkdir -p "$KDIR"
    ln -sfn "$arch_dir" "$KDIR/build"
    ln -sfn "$common_dir" "$KDIR/source"
    echo "setup: linked $KDIR/build -> $arch_dir"
fi

if ! grep -q " /sys/fs/bpf bpf " /proc/mounts; then
    mount -t bpf bpf /sys/fs/bpf
fi

# Debian's python3 (3.11) with system site-packages, so `import bcc` works.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,server,build]'
.venv/bin/python -c "import bcc, aus" 
echo "setup: ready (.venv/bin/ausd, .venv/bin/ausctl)"
