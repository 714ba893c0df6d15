#!/bin/bash
# What the aus-server tests need beyond scripts/setup.sh: PostgreSQL's
# binaries (the tests start their own throwaway server on a free port), and
# Debian's Chromium with its chromedriver for the console tests in
# tests/browser (Selenium, from the 'test' extra, drives them; no browser
# is downloaded). hypothesis and schemathesis, which drive the fuzz tests
# in tests/server/test_fuzz.py, come from the 'test' extra; a venv made
# before they joined it gets them here.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
updated=
apt_install() {
    [ -n "$updated" ] || { apt-get update -q >/dev/null; updated=1; }
    apt-get install -y -q "$@" >/dev/null
}
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt_install postgresql
fi
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    # The page needs one font; DejaVu is Debian's default.
    apt_install --no-install-recommends chromium chromium-driver fonts-dejavu-core
fi
# docker-compose (Debian's) validates packaging/server/compose.yaml
# (tests/server/test_compose_file.py); it needs no Docker daemon for that.
if ! command -v docker-compose >/dev/null 2>&1; then
    apt_install --no-install-recommends docker-compose
fi
# The Debian packages the aus-server package depends on (what it does not
# vendor): tests/kernel/test_debian_package.py runs the extracted package
# on the system's python3.
for p in python3-yaml python3-prometheus-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        apt_install --no-install-recommends "$p"
done
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import hypothesis, schemathesis" 2>/dev/null; then
    .venv/bin/python -m pip install -q --disable-pip-version-check 'hypothesis>=6.100' 'schemathesis>=4.0'
fi
echo "server-packages: ready"
