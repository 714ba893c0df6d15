#!/bin/bash
# What the aus-server tests need beyond scripts/setup.sh: PostgreSQL's
# binaries (the tests start their own throwaway server on a free port), and
# Debian's Chromium with its chromedriver for the console tests in
# tests/browser (Selenium, from the 'test' extra, drives them; no browser
# is downloaded).
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
echo "server-packages: ready"
