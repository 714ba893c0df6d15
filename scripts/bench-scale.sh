#!/bin/bash
# Set up everything and run the fleet-scale suite (bench.scale); the results
# go to BENCHMARKS-scale.md (copy the figures into BENCHMARKS.md).
#   sudo scripts/bench-scale.sh            every part at full size
#   sudo scripts/bench-scale.sh --tiny     a smoke run
#   sudo scripts/bench-scale.sh --only fleet,sync
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "bench-scale.sh: needs root; run: sudo $0" >&2
    exit 2
fi
bash scripts/setup.sh >/dev/null
bash scripts/server-packages.sh >/dev/null
exec .venv/bin/python -m bench.scale "$@"
