#!/bin/bash
# Install, idempotently, the identity stack the identity tests build in a
# private mount namespace (tests/identity): OpenLDAP slapd, its client
# tools, SSSD with the LDAP provider, the sss NSS and PAM modules,
# pamtester, sssd-tools for `sss_cache` (the tests flush SSSD's caches
# with it; none of the other packages ships it), and the libsss_nss_idmap
# Python bindings (the tests ask SSSD for group SIDs with them, as ausd
# does). Nothing is configured or started here. Note that the packages'
# postinst scripts add `sss` to the host's /etc/nsswitch.conf and pam_sss
# to /etc/pam.d/common-* (the tests never rely on that). Needs root when
# something is missing.
set -euo pipefail

PACKAGES=(slapd ldap-utils sssd-ldap libnss-sss libpam-sss pamtester sssd-tools
          python3-libsss-nss-idmap)

exec bash "$(dirname "$0")/apt-missing.sh" identity-packages "${PACKAGES[@]}"
