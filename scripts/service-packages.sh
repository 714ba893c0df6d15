#!/bin/bash
# Install, idempotently, what the service tests (tests/service) need on the
# host to boot a Debian 12 container with systemd: systemd-nspawn,
# debootstrap and nsenter. Needs root when something is missing.
set -euo pipefail

PACKAGES=(systemd-container debootstrap util-linux)

exec bash "$(dirname "$0")/apt-missing.sh" service-packages "${PACKAGES[@]}"
