#!/bin/bash
# Install, idempotently, what the service tests (tests/service) need on the
# host to boot a Debian 12 container with systemd: systemd-nspawn,
# debootstrap and nsenter. Needs root when something is missing.
set -euo pipefail

PACKAGES=(systemd-container debootstrap util-linux)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "service-packages: all installed (${PACKAGES[*]})"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "service-packages: missing ${missing[*]}; run as root to install" >&2
    exit 1
fi
echo "service-packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "service-packages: installed ${missing[*]}"
