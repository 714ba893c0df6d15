#!/bin/bash
# Build the Debian package: dist/aus_<version>_amd64.deb. One command:
#   packaging/debian/build.sh
# pydantic 2 is not in Debian 12 (which has 1.10), so it is vendored from
# PyPI into /usr/lib/aus/vendor; the rest comes from Debian's packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=$(/usr/bin/python3 -c "import re; print(re.search(r'^version = \"(.+)\"', open('pyproject.toml').read(), re.M).group(1))")
OUT=dist
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
install -d "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT/usr/lib/aus/python" "$ROOT/usr/lib/aus/vendor" \
    "$ROOT/usr/share/aus/bpf" "$ROOT/etc/aus" "$ROOT/lib/systemd/system" \
    "$ROOT/usr/lib/tmpfiles.d" "$ROOT/usr/share/doc/aus"
cp -r daemon/aus "$ROOT/usr/lib/aus/python/"
find "$ROOT/usr/lib/aus/python" -name __pycache__ -prune -exec rm -rf {} +
cp bpf/aus.h bpf/aus.bpf.c "$ROOT/usr/share/aus/bpf/"
/usr/bin/python3 -m pip install -q --disable-pip-version-check --no-compile \
    --target "$ROOT/usr/lib/aus/vendor" "pydantic>=2.5,<3"
for tool in ausd:aus.agent.ausd ausctl:aus.cli.ausctl; do
    module=${tool#*:} tool=${tool%%:*}
    cat > "$ROOT/usr/bin/$tool" <<WRAP
#!/bin/sh
export PYTHONPATH=/usr/lib/aus/python:/usr/lib/aus/vendor
exec /usr/bin/python3 -m $module "\$@"
WRAP
    chmod 755 "$ROOT/usr/bin/$tool"
done
install -m 644 packaging/ausd.yaml "$ROOT/etc/aus/ausd.yaml"
install -m 644 packaging/policy.example.yaml "$ROOT/usr/share/doc/aus/policy.example.yaml"
install -m 644 README.md docs/policy-format.md docs/policy-server-client.md "$ROOT/usr/share/doc/aus/"
install -m 644 packaging/pam/README.md "$ROOT/usr/share/doc/aus/PAM.md"
install -m 755 packaging/pam/aus-pam-hook "$ROOT/usr/lib/aus/aus-pam-hook"
install -m 755 packaging/debian/link-kernel-headers "$ROOT/usr/lib/aus/link-kernel-headers"
install -m 644 packaging/systemd/ausd.service "$ROOT/lib/systemd/system/ausd.service"
install -m 644 packaging/systemd/aus.tmpfiles.conf "$ROOT/usr/lib/tmpfiles.d/aus.conf"
sed "s/@VERSION@/$VERSION/" packaging/debian/control.in > "$ROOT/DEBIAN/control"
install -m 755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$ROOT/DEBIAN/"
echo /etc/aus/ausd.yaml > "$ROOT/DEBIAN/conffiles"
mkdir -p "$OUT"
dpkg-deb --root-owner-group --build "$ROOT" "$OUT/aus_${VERSION}_amd64.deb" >/dev/null
echo "$OUT/aus_${VERSION}_amd64.deb"
