#!/bin/bash
# Set up everything (scripts/setup.sh, and the identity stack's packages)
# and run the whole test suite: unit tests; kernel tests, which load the
# real programs on cgroups, users and network namespaces they create and
# remove; identity tests, which log directory users in through slapd, sssd
# and PAM built in a private mount namespace. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "test.sh: the kernel tests need root; run it as root (or prefix it with sudo)" >&2
    exit 2
fi
bash scripts/setup.sh
bash scripts/identity-packages.sh
bash scripts/server-packages.sh
bash scripts/service-packages.sh
bash scripts/manual-packages.sh
exec .venv/bin/python -m pytest -ra "$@"
