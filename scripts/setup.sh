#!/bin/bash
# Set up everything aus needs, idempotently: packages, kernel headers for
# bcc, bpffs, and a virtualenv (.venv) that sees the system's bcc.
# Installs with apt on Debian 12 and 13 and Ubuntu 24.04. Without apt-get
# it checks that what aus needs is there, and if not, says what to install
# and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

KVER=$(uname -r)
KDIR=/lib/modules/$KVER
# What each package is for (Debian and Ubuntu names).
APT_PACKAGES=(python3-bpfcc python3-venv python3-pip
              iproute2 iputils-ping nftables passwd procps python3-libsss-nss-idmap)
NEEDS="  the eBPF compiler, for Python (bcc):      python3-bpfcc
  the running kernel's headers, for bcc:   linux-headers-$KVER
  inspecting BPF programs and maps:        bpftool
  Python >= 3.11 with venv and pip:        python3 python3-venv python3-pip
  network namespaces and traffic (tests):  iproute2 iputils-ping nftables
  users, groups and processes:             passwd procps
  SSSD's group SIDs (Active Directory):    python3-libsss-nss-idmap"

# Installing, linking headers and mounting bpffs need root; checking does not.
need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: needs root; run it as root (or prefix it with sudo)" >&2
        exit 2
    fi
}

if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    # Check what aus uses, not package names: another distribution may
    # provide it under its own.
    missing=()
    /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || missing+=("Python >= 3.11 as /usr/bin/python3")
    /usr/bin/python3 -c 'import bcc' 2>/dev/null || missing+=("bcc's Python module (import bcc)")
    /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=("Python's venv and ensurepip")
    [ -e "$KDIR/build/include" ] || missing+=("kernel headers in $KDIR/build")
    for tool in bpftool ip ping nft useradd ps; do
        command -v "$tool" >/dev/null || missing+=("the command $tool")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        {
            echo "setup: this system has no apt-get, and aus installs packages only with apt"
            echo "(Debian 12/13, Ubuntu 24.04). Missing here:"
            printf '  - %s\n' "${missing[@]}"
            echo "What aus needs, by purpose (Debian/Ubuntu package names; install your"
            echo "distribution's equivalents, then run scripts/setup.sh again):"
            echo "$NEEDS"
        } >&2
        exit 1
    fi
    echo "setup: no apt-get; everything aus needs is present, installing nothing"
else
    need_root
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ] || [ ! -e "$KDIR/build/include" ] || ! command -v bpftool >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
    fi
    # first_known PKG...: the first package the archive has.
    first_known() {
        local p
        for p in "$@"; do
            if apt-cache show --no-all-versions "$p" >/dev/null 2>&1; then
                echo "$p"
                return
            fi
        done
        echo "setup: the package archive has none of: $*" >&2
        exit 1
    }
    # Kernel headers, only when the running kernel has none: its own
    # package where the archive has it (Debian and Ubuntu both name it
    # linux-headers-$(uname -r)); else the newest of the distribution's
    # meta-package, which serves any kernel (every kernel-internal offset
    # the programs use is read from BTF; see link-kernel-headers).
    if [ ! -e "$KDIR/build/include" ]; then
        missing+=("$(first_known "linux-headers-$KVER" "linux-headers-$(dpkg --print-architecture)" \
                                  linux-headers-generic)")
    fi
    # bpftool: its own package on Debian; Ubuntu ships it with the
    # kernel's tools.
    if ! command -v bpftool >/dev/null; then
        missing+=("$(first_known bpftool "linux-tools-$KVER")")
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

need_root
# bcc compiles against /lib/modules/$(uname -r)/build. When the running
# kernel ships no headers, link the newest installed header tree.
sh packaging/debian/link-kernel-headers | sed 's/^aus:/setup:/'

if ! grep -q " /sys/fs/bpf bpf " /proc/mounts; then
    mount -t bpf bpf /sys/fs/bpf
fi

# The system's python3 with system site-packages, so `import bcc` works.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,server,build]'
.venv/bin/python -c "import bcc, aus"
echo "setup: ready (.venv/bin/ausd, .venv/bin/ausctl)"
