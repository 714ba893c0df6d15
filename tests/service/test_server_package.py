"""The aus-server package alone on a clean Debian 12 booted with systemd:
apt installs it with what its Depends name and nothing of the agent, and
/usr/bin/aus-server serves from it, on SQLite in its default place and on
Debian's PostgreSQL through Debian's psycopg; removing it leaves nothing
behind. (Here it runs as transient units, as root; its own unit is
tests/service/test_server_unit.py's.)"""

from __future__ import annotations

import contextlib
import json

import pytest

from tests.support.polling import wait_until

from . import container

# Run inside the container by its python3, the one aus-server runs on.
WHOAMI = """
import base64, json, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1], headers={
    "Authorization": "Basic " + base64.b64encode(sys.argv[2].encode()).decode()})
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(json.dumps([r.status, json.load(r)]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, None]))
except OSError:
    sys.exit(1)
"""
PG_URL = "postgresql:///aus?host=/var/run/postgresql"


@pytest.fixture(scope="module")
def server_box(debs):
    deb = debs["aus-server"]
    # PostgreSQL is fetched with the package (the container has no network
    # once booted) and installed by the test that uses it.
    with container.machine(deb, {}, packages=("postgresql",)) as m:
        install = m.run("apt-get", "install", "-y", "-q", f"{container.GUEST_DIR}/{deb.name}",
                        check=False, timeout=900)
        yield m, install


def installed(m, package: str) -> bool:
    p = m.run("dpkg-query", "-W", "-f=${Status}", package, check=False)
    return "install ok installed" in p.stdout


@contextlib.contextmanager
def serving(m, unit: str, *args: str):
    """``aus-server serve ARGS`` as a transient unit, stopped afterwards."""
    m.run("systemd-run", f"--unit={unit}", "--collect", "/usr/bin/aus-server", "serve", *args)
    try:
        yield
    finally:
        m.systemctl("stop", unit, check=False)


def whoami(m, unit: str, port: int, key: str):
    def answer():
        active = m.systemctl("is-active", unit, check=False).stdout.strip()
        assert active in ("active", "activating"), m.run(
            "journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False).stdout[-3000:]
        p = m.run("python3", "-c", WHOAMI, f"http://127.0.0.1:{port}/api/whoami", key,
                  check=False)
        if p.returncode != 0:
            return None
        status, body = json.loads(p.stdout)
        return [status, body and {k: body[k] for k in ("org", "key")}]   # not its scopes
    return wait_until(answer, timeout=60, interval=0.5, what=f"{unit} answering")


def test_installs_alone_with_its_dependencies_and_nothing_of_the_agent(server_box):
    m, install = server_box
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert installed(m, "aus-server") and installed(m, "python3-psycopg")
    for package in ("aus", "python3-bpfcc", "linux-headers-amd64", "python3-fastapi",
                    "python3-sqlalchemy"):
        assert not installed(m, package), package
    assert m.run("aus-server", "--help").returncode == 0


def test_serves_on_sqlite_in_its_default_place(server_box):
    m, _ = server_box
    key = m.run("aus-server", "api-key", "create", "--org", "1").stdout.strip()
    assert m.run("test", "-f", "/var/lib/aus-server/aus-server.db", check=False).returncode == 0
    with serving(m, "aus-server-sqlite", "--listen", "127.0.0.1:8443"):
        assert whoami(m, "aus-server-sqlite", 8443, key) == [200, {"org": "1",
                                                                   "key": key.split(":")[0]}]
        assert whoami(m, "aus-server-sqlite", 8443, key.split(":")[0] + ":wrong")[0] == 401


def test_serves_on_debians_postgresql_through_debians_psycopg(server_box):
    m, _ = server_box
    p = m.run("apt-get", "install", "-y", "-q", "postgresql", check=False, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    wait_until(lambda: m.run("pg_isready", "-q", check=False).returncode == 0, timeout=60,
               interval=0.5, what="PostgreSQL ready")
    m.run("runuser", "-u", "postgres", "--", "psql", "-q", "-c", "CREATE ROLE root LOGIN")
    m.run("runuser", "-u", "postgres", "--", "createdb", "-O", "root", "aus")
    # On aus-server's path, psycopg is Debian's (the package holds none).
    found = m.run("env", "PYTHONPATH=/usr/lib/aus-server/python:/usr/lib/aus-server/vendor",
                  "python3", "-c", "import psycopg; print(psycopg.__file__)").stdout.strip()
    assert found == "/usr/lib/python3/dist-packages/psycopg/__init__.py"
    key = m.run("aus-server", "api-key", "create", "--org", "2", "--db", PG_URL).stdout.strip()
    keys = m.run("runuser", "-u", "postgres", "--", "psql", "-At", "-d", "aus", "-c",
                   "SELECT count(*) FROM api_keys").stdout.strip()
    assert keys == "1"
    with serving(m, "aus-server-pg", "--listen", "127.0.0.1:8444", "--db", PG_URL):
        assert whoami(m, "aus-server-pg", 8444, key) == [200, {"org": "2",
                                                               "key": key.split(":")[0]}]


def test_purge_leaves_nothing_behind(server_box):
    m, _ = server_box
    p = m.run("apt-get", "purge", "-y", "-q", "aus-server", check=False, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "not empty so not removed" not in p.stdout + p.stderr
    for path in ("/usr/lib/aus-server", "/usr/bin/aus-server", "/usr/share/doc/aus-server"):
        assert m.run("test", "-e", path, check=False).returncode != 0, path
