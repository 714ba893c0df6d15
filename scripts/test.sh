#!/bin/bash
# Set up everything (scripts/setup.sh) and run the whole test suite: unit
# tests, then the kernel tests, which load the real programs on cgroups,
# users and network namespaces they create and remove. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "test.sh: the kernel tests need root; run: sudo $0" >&2
    exit 2
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
