#!/bin/bash
# Set up everything (scripts/setup.sh) and run the benchmark suite; the
# results go to BENCHMARKS-results.md (copy the figures into BENCHMARKS.md).
#   sudo scripts/bench.sh           the full suite (about 20 minutes)
#   sudo scripts/bench.sh --tiny    a smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "bench.sh: needs root; run: sudo $0" >&2
    exit 2
fi
bash scripts/setup.sh >/dev/null
command -v nft >/dev/null || { apt-get install -y -qq --no-install-recommends nftables >/dev/null; }
command -v cc >/dev/null || { apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null; }
exec .venv/bin/python -m bench.run "$@"
