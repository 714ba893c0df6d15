#!/bin/bash
# What the aus-server tests need beyond scripts/setup.sh: PostgreSQL's
# binaries (the tests start their own throwaway server on a free port).
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q postgresql >/dev/null
fi
echo "server-packages: ready"
