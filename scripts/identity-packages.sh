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

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "identity-packages: all installed (${PACKAGES[*]})"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "identity-packages: missing ${missing[*]}; run as root to install" >&2
    exit 1
fi
echo "identity-packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "identity-packages: installed ${missing[*]}"
