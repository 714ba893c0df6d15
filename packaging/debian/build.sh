#!/bin/bash
# Build the two Debian packages with one command:
#   packaging/debian/build.sh
# and print their paths, one a line, the agent's last:
#   dist/aus-server_<version>_amd64.deb   aus-server, the policy server
#   dist/aus_<version>_amd64.deb          the agent: ausd, ausctl, PAM hook, unit
#
# Each package has its own prefix and shares no file with the other, so
# both install on one host. The agent holds aus.core, aus.logs, aus.agent and aus.cli
# (no server code, no server dependency); aus-server holds aus.core, aus.logs and
# aus.server (never the agent: the server does not touch the kernel).
#
# Python dependencies come from Debian 12 where bookworm has the version
# pyproject.toml asks for; the others are vendored from PyPI, at the
# version pyproject.toml asks for, into the package's own vendor directory:
#   agent   Debian: PyYAML, bcc, dnspython    vendored: pydantic 2 (bookworm: 1.10)
#   server  Debian: PyYAML, psycopg 3.1       vendored: pydantic 2 (1.10),
#           fastapi >= 0.110 (0.92), uvicorn >= 0.29 (0.17), SQLAlchemy 2
#           (1.4), alembic >= 1.13 (1.8), scim2-models (absent), and what
#           they need. Vendored wheels are built for the CPython that runs
#           this script (pydantic-core and MarkupSafe are compiled per minor
#           version), so both controls depend on exactly that minor version:
#           build on the release you install on (Debian 12: 3.11, Ubuntu
#           24.04: 3.12, Debian 13: 3.13; docs/first-run.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=$(/usr/bin/python3 -c "import re; print(re.search(r'^version = \"(.+)\"', open('pyproject.toml').read(), re.M).group(1))")
PYTHON_DEPENDS=$(/usr/bin/python3 -c 'import sys; M, m = sys.version_info[:2]; print(f"python3 (>= {M}.{m}), python3 (<< {M}.{m + 1})")')
OUT=dist
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The requirement pyproject.toml states for each named distribution
# (dependencies or optional-dependencies), e.g. "pydantic>=2.5,<3".
requirements() {
    /usr/bin/python3 - "$@" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
declared = list(project["dependencies"])
for group in project.get("optional-dependencies", {}).values():
    declared += group
def name(req):
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")
by_name = {name(r): r for r in declared}
for wanted in sys.argv[1:]:
    if wanted.lower() not in by_name:
        sys.exit(f"build.sh: {wanted} is not a dependency in pyproject.toml")
    print(by_name[wanted.lower()])
PY
}

# vendor DIR DIST...: install the named distributions and what they need
# from PyPI into DIR, wheels only (no compiler runs at build time).
vendor() {
    local dir=$1
    shift
    local reqs
    mapfile -t reqs < <(requirements "$@")
    /usr/bin/python3 -m pip install -q --disable-pip-version-check --no-compile \
        --only-binary=:all: --target "$dir" "${reqs[@]}"
    # Console scripts pip writes for the vendored tools: the packages have
    # their own entry points in /usr/bin.
    rm -rf "$dir/bin"
}

# wrapper PATH MODULE PYTHONPATH: /usr/bin/<tool> runs MODULE with the
# system's python3 on the package's own tree.
wrapper() {
    cat > "$1" <<WRAP
#!/bin/sh
export PYTHONPATH=$3
exec /usr/bin/python3 -m $2 "\$@"
WRAP
    chmod 755 "$1"
}

# copy_modules DEST MODULE...: daemon/aus/MODULE into DEST/aus, with
# aus/__init__.py and without bytecode.
copy_modules() {
    local dest=$1
    shift
    install -d "$dest/aus"
    install -m 644 daemon/aus/__init__.py "$dest/aus/"
    for module in "$@"; do
        cp -r "daemon/aus/$module" "$dest/aus/"
    done
    find "$dest" -name __pycache__ -prune -exec rm -rf {} +
}

# ---- aus: the agent ---------------------------------------------------------
ROOT=$WORK/aus
install -d "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT/usr/lib/aus/python" "$ROOT/usr/lib/aus/vendor" \
    "$ROOT/usr/share/aus/bpf" "$ROOT/etc/aus" "$ROOT/lib/systemd/system" \
    "$ROOT/usr/lib/tmpfiles.d" "$ROOT/usr/share/doc/aus"
copy_modules "$ROOT/usr/lib/aus/python" core logs agent cli
cp bpf/aus.h bpf/aus.bpf.c "$ROOT/usr/share/aus/bpf/"
vendor "$ROOT/usr/lib/aus/vendor" pydantic
wrapper "$ROOT/usr/bin/ausd" aus.agent.ausd /usr/lib/aus/python:/usr/lib/aus/vendor
wrapper "$ROOT/usr/bin/ausctl" aus.cli.ausctl /usr/lib/aus/python:/usr/lib/aus/vendor
install -m 644 packaging/ausd.yaml "$ROOT/etc/aus/ausd.yaml"
install -m 644 packaging/policy.example.yaml "$ROOT/usr/share/doc/aus/policy.example.yaml"
install -m 644 README.md docs/first-run.md docs/policy-format.md docs/policy-server-client.md \
    "$ROOT/usr/share/doc/aus/"
install -m 644 packaging/pam/README.md "$ROOT/usr/share/doc/aus/PAM.md"
install -m 755 packaging/pam/aus-pam-hook "$ROOT/usr/lib/aus/aus-pam-hook"
install -m 755 packaging/debian/link-kernel-headers "$ROOT/usr/lib/aus/link-kernel-headers"
install -m 644 packaging/systemd/ausd.service "$ROOT/lib/systemd/system/ausd.service"
install -m 644 packaging/systemd/aus.tmpfiles.conf "$ROOT/usr/lib/tmpfiles.d/aus.conf"
sed "s/@VERSION@/$VERSION/; s/@PYTHON_DEPENDS@/$PYTHON_DEPENDS/" packaging/debian/control.in > "$ROOT/DEBIAN/control"
install -m 755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$ROOT/DEBIAN/"
echo /etc/aus/ausd.yaml > "$ROOT/DEBIAN/conffiles"

# ---- aus-server: the policy server ------------------------------------------
# aus-server.service runs it as the system user aus-server (sysusers.d),
# with its SQLite database in /var/lib/aus-server (StateDirectory); it is
# enabled by the postinst and starts once /etc/aus/aus-server.env exists
# (docs/server-deploy.md). The package ships no file in /etc.
SROOT=$WORK/aus-server
install -d "$SROOT/DEBIAN" "$SROOT/usr/bin" "$SROOT/usr/lib/aus-server/python" \
    "$SROOT/usr/lib/aus-server/vendor" "$SROOT/usr/share/doc/aus-server" \
    "$SROOT/lib/systemd/system" "$SROOT/usr/lib/sysusers.d"
copy_modules "$SROOT/usr/lib/aus-server/python" core logs server
vendor "$SROOT/usr/lib/aus-server/vendor" pydantic fastapi uvicorn SQLAlchemy alembic scim2-models
wrapper "$SROOT/usr/bin/aus-server" aus.server.cli /usr/lib/aus-server/python:/usr/lib/aus-server/vendor
install -m 644 README.md docs/server.md docs/server-deploy.md docs/scim.md docs/console.md \
    "$SROOT/usr/share/doc/aus-server/"
install -m 644 packaging/server/aus-server.env "$SROOT/usr/share/doc/aus-server/aus-server.env.example"
install -m 644 packaging/systemd/aus-server.service "$SROOT/lib/systemd/system/aus-server.service"
install -m 644 packaging/systemd/aus-server.sysusers "$SROOT/usr/lib/sysusers.d/aus-server.conf"
sed "s/@VERSION@/$VERSION/; s/@PYTHON_DEPENDS@/$PYTHON_DEPENDS/" packaging/debian/aus-server.control.in > "$SROOT/DEBIAN/control"
install -m 755 packaging/debian/aus-server.postinst "$SROOT/DEBIAN/postinst"
install -m 755 packaging/debian/aus-server.prerm "$SROOT/DEBIAN/prerm"
install -m 755 packaging/debian/aus-server.postrm "$SROOT/DEBIAN/postrm"

# ---- man pages and bash/zsh completions, both packages ----------------------
# Made from each command's own parser (python3 -m aus.manual, in neither
# package) on the package's vendored dependencies, so every subcommand and
# option is in them. shtab writes the completions here only: what it
# writes is plain shell, and neither package depends on it. The modules
# Debian provides at run time come from PyPI here, so the build host needs
# none of them. Pages are dated by the last commit, for reproducible builds.
TOOLS=$WORK/tools
vendor "$TOOLS" shtab PyYAML prometheus-client dnspython
MANUAL_DATE=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
SOURCE_DATE_EPOCH=$MANUAL_DATE PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=daemon:$ROOT/usr/lib/aus/vendor:$TOOLS \
    /usr/bin/python3 -m aus.manual "$ROOT" ausd ausctl
SOURCE_DATE_EPOCH=$MANUAL_DATE PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=daemon:$SROOT/usr/lib/aus-server/vendor:$TOOLS \
    /usr/bin/python3 -m aus.manual "$SROOT" aus-server

mkdir -p "$OUT"
dpkg-deb --root-owner-group --build "$SROOT" "$OUT/aus-server_${VERSION}_amd64.deb" >/dev/null
dpkg-deb --root-owner-group --build "$ROOT" "$OUT/aus_${VERSION}_amd64.deb" >/dev/null
echo "$OUT/aus-server_${VERSION}_amd64.deb"
echo "$OUT/aus_${VERSION}_amd64.deb"
