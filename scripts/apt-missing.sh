#!/bin/bash
# Install, idempotently, the Debian packages among PKG... that are missing.
#   scripts/apt-missing.sh LABEL PKG...
# LABEL prefixes the messages. Needs root when something is missing.
set -euo pipefail
label=$1
shift
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "$label: all installed ($*)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "$label: missing ${missing[*]}; run as root to install" >&2
    exit 1
fi
echo "$label: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "$label: installed ${missing[*]}"
