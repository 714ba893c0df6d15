#!/bin/bash
# Install, idempotently, what the manual tests (tests/unit/test_manpages.py)
# run the generated pages and completions with: groff and man-db render and
# check the man pages, zsh loads its completions. Needs root when something
# is missing.
set -euo pipefail

PACKAGES=(groff-base man-db zsh)

exec bash "$(dirname "$0")/apt-missing.sh" manual-packages "${PACKAGES[@]}"
