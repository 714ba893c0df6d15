"""aus-server.service from the aus-server package on a clean Debian 12
booted with systemd: enabled by the install but not started until
/etc/aus/aus-server.env exists; then serving HTTPS as the unprivileged
system user aus-server, its SQLite database in the state directory (also
when root made it first, with `aus-server api-key create`);
`systemctl reload` puts a renewed certificate in service without a
restart, and keeps the old one when the new one does not load; on
Debian's PostgreSQL the sandboxed server works through Debian's psycopg. The
hardening's exposure level, as `systemd-analyze security` rates it, is
printed and bounded."""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import subprocess

import pytest

from tests.support.polling import wait_until

from . import container

PORT = 8443
# Run inside the container by its python3.
PEER = """
import hashlib, socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5) as raw, \\
        ctx.wrap_socket(raw, server_hostname="localhost") as tls:
    print(hashlib.sha256(tls.getpeercert(True)).hexdigest())
"""
WHOAMI = """
import base64, json, ssl, sys, urllib.error, urllib.request
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
req = urllib.request.Request(sys.argv[1], headers={
    "Authorization": "Basic " + base64.b64encode(sys.argv[2].encode()).decode()})
try:
    with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
        print(json.dumps([r.status, json.load(r)]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, None]))
except OSError:
    sys.exit(1)
"""
TLS_DIR = "/etc/aus/tls"
ENV = (f"AUS_SERVER_OPTS=--listen 127.0.0.1:{PORT} --tls-cert {TLS_DIR}/server.crt "
       f"--tls-key {TLS_DIR}/server.key\n")
# systemd-analyze's scale: 0 (best) to 10; ausd, which needs five
# capabilities and a writable bpffs, rates far worse.
MAX_EXPOSURE = 2.5


def pair(directory, name: str) -> dict:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}"], check=True, capture_output=True)
    return {cert.name: cert, key.name: key}


def sha256(cert) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    return {**pair(d, "a"), **pair(d, "b")}


@pytest.fixture(scope="module")
def unit_box(debs, certs):
    deb = debs["aus-server"]
    # PostgreSQL is fetched with the package (the container has no network
    # once booted) and installed by the test that uses it.
    with container.machine(deb, certs, packages=("postgresql",)) as m:
        # The apt archive is shared with other test runs' containers, which
        # may hold its lock for a while.
        yield m, apt_install(m, f"{container.GUEST_DIR}/{deb.name}")


def apt_install(m, *packages: str) -> subprocess.CompletedProcess:
    return wait_until(lambda: unlocked(m.run("apt-get", "install", "-y", "-q", *packages,
                                             check=False, timeout=900)),
                      timeout=600, interval=5, what="the apt archive's lock")


def unlocked(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess | None:
    return None if "Could not get lock /var/cache/apt/archives/lock" in p.stderr else p


def put_certificate(m, name: str) -> None:
    """Install NAME's pair as the served one, root:aus-server 0640, each
    file renamed into place."""
    for ext in ("crt", "key"):
        m.run("install", "-m", "640", "-o", "root", "-g", "aus-server",
              f"{container.GUEST_DIR}/{name}.{ext}", f"{TLS_DIR}/server.{ext}.new")
        m.run("mv", f"{TLS_DIR}/server.{ext}.new", f"{TLS_DIR}/server.{ext}")


def served(m) -> str | None:
    p = m.run("python3", "-c", PEER, str(PORT), check=False)
    return p.stdout.strip() if p.returncode == 0 else None


def whoami(m, key: str):
    """[status, {"org", "key"}] of GET /api/whoami with ``key``."""
    p = m.run("python3", "-c", WHOAMI, f"https://127.0.0.1:{PORT}/api/whoami", key, check=False)
    if p.returncode != 0:
        return None
    status, body = json.loads(p.stdout)
    return [status, body and {k: body[k] for k in ("org", "key")}]


def journal(m) -> str:
    return m.run("journalctl", "-u", "aus-server", "--no-pager", "-o", "cat", check=False).stdout


def test_installed_enabled_and_waiting_for_its_configuration(unit_box):
    m, install = unit_box
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    state = m.show("aus-server", "ActiveState", "UnitFileState", "ConditionResult")
    assert state == {"ActiveState": "inactive", "UnitFileState": "enabled",
                     "ConditionResult": "no"}, state
    assert m.run("getent", "passwd", "aus-server").stdout.split(":")[6].strip() == "/usr/sbin/nologin"
    # Unconfigured, a start is skipped, not failed.
    assert m.systemctl("start", "aus-server", check=False).returncode == 0
    assert m.show("aus-server", "ActiveState")["ActiveState"] == "inactive"


def test_serves_as_its_own_user_on_the_database_root_made_first(unit_box, certs):
    m, _ = unit_box
    # The operator's first key, made as root before the service ever ran.
    key = m.run("aus-server", "api-key", "create", "--org", "1").stdout.strip()
    assert m.run("stat", "-c", "%U", "/var/lib/aus-server/aus-server.db").stdout.strip() == "root"
    m.run("install", "-d", "-m", "750", "-o", "root", "-g", "aus-server", TLS_DIR)
    put_certificate(m, "a")
    m.write("/etc/aus/aus-server.env", ENV)
    m.systemctl("start", "aus-server")
    wait_until(lambda: served(m), timeout=60, interval=0.5, what="aus-server serving TLS")
    assert served(m) == sha256(certs["a.crt"])
    assert whoami(m, key) == [200, {"org": "1", "key": key.split(":")[0]}], journal(m)[-3000:]

    main_pid = m.show("aus-server", "MainPID")["MainPID"]
    status = m.run("cat", f"/proc/{main_pid}/status").stdout
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    assert uid != 0 and uid == int(m.run("id", "-u", "aus-server").stdout)
    assert re.search(r"^CapEff:\s+0+$", status, re.M), status
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    # The state directory and the database are the service's, not root's.
    for path in ("/var/lib/aus-server", "/var/lib/aus-server/aus-server.db"):
        assert m.run("stat", "-c", "%U %a", path).stdout.split()[0] == "aus-server", path
    assert m.run("stat", "-c", "%a", "/var/lib/aus-server").stdout.strip() == "700"

    # A key made by root while the service runs is served at once.
    second = m.run("aus-server", "api-key", "create", "--org", "2").stdout.strip()
    assert whoami(m, second) == [200, {"org": "2", "key": second.split(":")[0]}]
    assert m.run("stat", "-c", "%U", "/var/lib/aus-server/aus-server.db").stdout.strip() == "aus-server"


def test_reload_serves_the_renewed_certificate_and_keeps_it_over_a_broken_one(unit_box, certs):
    m, _ = unit_box
    before = m.show("aus-server", "MainPID", "NRestarts")
    put_certificate(m, "b")
    assert served(m) == sha256(certs["a.crt"])
    m.systemctl("reload", "aus-server")
    wait_until(lambda: served(m) == sha256(certs["b.crt"]), timeout=30, interval=0.5,
               what="the renewed certificate served")
    # A's certificate with B's key: refused, B stays.
    m.run("install", "-m", "640", "-o", "root", "-g", "aus-server",
          f"{container.GUEST_DIR}/a.crt", f"{TLS_DIR}/server.crt")
    m.systemctl("reload", "aus-server")
    wait_until(lambda: "TLS certificate not replaced" in journal(m), timeout=30, interval=0.5,
               what="the refusal in the journal")
    assert served(m) == sha256(certs["b.crt"])
    assert m.show("aus-server", "MainPID", "NRestarts") == before
    assert m.show("aus-server", "ActiveState")["ActiveState"] == "active"


def test_serves_on_postgresql_through_debians_psycopg_in_the_sandbox(unit_box):
    """psycopg reaches libpq through ctypes: its callbacks must work under
    MemoryDenyWriteExecute=, and peer authentication sees the service's user."""
    m, _ = unit_box
    p = apt_install(m, "postgresql")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    wait_until(lambda: m.run("pg_isready", "-q", check=False).returncode == 0, timeout=60,
               interval=0.5, what="PostgreSQL ready")
    m.run("runuser", "-u", "postgres", "--", "createuser", "aus-server")
    m.run("runuser", "-u", "postgres", "--", "createdb", "-O", "aus-server", "aus")
    url = "postgresql:///aus?host=/run/postgresql"
    key = m.run("runuser", "-u", "aus-server", "--", "aus-server", "api-key", "create",
                "--org", "3", "--db", url).stdout.strip()
    m.write("/etc/aus/aus-server.env", ENV + f"AUS_SERVER_DB={url}\n")
    put_certificate(m, "b")     # the last test left a pair that does not load
    m.systemctl("restart", "aus-server")
    try:
        wait_until(lambda: whoami(m, key), timeout=60, interval=0.5, what="aus-server on PostgreSQL")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{journal(m)[-4000:]}") from None
    assert whoami(m, key) == [200, {"org": "3", "key": key.split(":")[0]}], journal(m)[-3000:]
    assert m.show("aus-server", "ActiveState")["ActiveState"] == "active"


def test_hardening_exposure(unit_box):
    m, _ = unit_box
    out = m.run("systemd-analyze", "security", "--no-pager", "aus-server.service").stdout
    line = next(x for x in out.splitlines() if "Overall exposure level" in x)
    print(line)
    level = float(re.search(r":\s*([0-9.]+)", line).group(1))
    assert level <= MAX_EXPOSURE, out
