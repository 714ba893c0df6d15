"""The Debian packages build with one command. The agent's (``aus``) holds
no server code and pulls no server dependency; it installs with its
dependencies, and the installed ausd starts and enforces. The policy
server's (``aus-server``) holds the server and none of the agent, shares no
file with the agent's, and runs from its own tree on the system's python3."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import tomllib
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

from tests.support import lab
from tests.support.debpkg import files

from .conftest import lab_policy

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]
AGENT_MODULES = ("core", "logs", "agent", "cli")
SERVER_MODULES = ("core", "logs", "server")
# Python distributions by their Debian 12 package, where it is not python3-<name>.
DEBIAN_NAMES = {"pyyaml": "python3-yaml"}
KERNEL_DEPENDS = {"python3-bpfcc", "linux-headers-amd64", "bpftool", "iproute2"}


def installed() -> bool:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "aus"], capture_output=True, text=True)
    return "install ok installed" in p.stdout


def canonical(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def requirement_name(req: str) -> str:
    return canonical(re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0])


def server_requirements() -> set[str]:
    """What aus-server needs: the server's extras, what the core needs of
    the agent's dependencies (pydantic and PyYAML), and prometheus-client
    (its /metrics)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return ({requirement_name(r) for r in project["optional-dependencies"]["server"]}
            | {"pydantic", "pyyaml", "prometheus-client"})


def regular_files(deb: Path) -> set[str]:
    return {p for p, mode in files(deb).items() if not mode.startswith("d")}


def depends(deb: Path) -> set[str]:
    """The package names in Depends (versions and alternatives dropped)."""
    text = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                          text=True, check=True).stdout
    return {alt.split("(")[0].strip() for dep in text.split(",") for alt in dep.split("|")
            if alt.strip()}


def vendored(deb: Path, vendor: str) -> dict[str, Path]:
    """The distributions in a package's vendor directory, by canonical name,
    with the path of their dist-info in the package."""
    found = {}
    for path in files(deb):
        m = re.fullmatch(re.escape(vendor) + r"/([^/]+)-[^-/]+\.dist-info/", path)
        if m:
            found[canonical(m.group(1))] = Path(path)
    return found


def source_tree(modules) -> set[str]:
    """daemon/aus's files the package should hold for these modules."""
    out = {"__init__.py"}
    for module in modules:
        for f in (REPO / "daemon/aus" / module).rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts:
                out.add(str(f.relative_to(REPO / "daemon/aus")))
    return out


def packaged_tree(deb: Path, python_dir: str) -> set[str]:
    prefix = f"{python_dir}/aus/"
    return {p[len(prefix):] for p in regular_files(deb) if p.startswith(prefix)}


@pytest.fixture(scope="module")
def extracted_server(debs):
    root = Path(tempfile.mkdtemp(prefix="aus-server-deb-"))
    try:
        subprocess.run(["dpkg-deb", "-x", str(debs["aus-server"]), str(root)], check=True)
        yield root
    finally:
        shutil.rmtree(root)


# ---- the agent package: no server ---------------------------------------------

def test_agent_package_holds_the_agent_and_no_server_file(debs):
    deb = debs["aus"]
    assert packaged_tree(deb, "/usr/lib/aus/python") == source_tree(AGENT_MODULES)
    listed = files(deb)
    assert not [p for p in listed if "/aus/server" in p or "migrations" in p or p.endswith(".js")]
    for path in ("/usr/bin/ausd", "/usr/bin/ausctl", "/lib/systemd/system/ausd.service",
                 "/usr/lib/aus/aus-pam-hook", "/usr/share/aus/bpf/aus.bpf.c", "/etc/aus/ausd.yaml"):
        assert path in listed, path
    assert "/usr/bin/aus-server" not in listed


def test_agent_package_vendors_pydantic_alone_and_depends_on_no_server_package(debs):
    deb = debs["aus"]
    vendor = vendored(deb, "/usr/lib/aus/vendor")
    assert "pydantic" in vendor
    root = Path(tempfile.mkdtemp(prefix="aus-deb-"))
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        # Everything vendored is pydantic or, transitively, something it requires.
        needed, todo = set(), ["pydantic"]
        while todo:
            dist = todo.pop()
            if dist in needed or dist not in vendor:
                continue
            needed.add(dist)
            metadata = (root / vendor[dist].relative_to("/") / "METADATA").read_text()
            todo += [requirement_name(line.split(":", 1)[1].strip())
                     for line in metadata.splitlines()
                     if line.startswith("Requires-Dist:") and "extra ==" not in line]
    finally:
        shutil.rmtree(root)
    assert set(vendor) == needed
    server_only = server_requirements() - {"pydantic", "pyyaml", "prometheus-client"}
    assert not server_only & set(vendor)
    assert not {DEBIAN_NAMES.get(d, f"python3-{d}") for d in server_only} & depends(deb)
    assert "aus-server" not in depends(deb)


# ---- the server package: no agent -----------------------------------------------

def test_server_package_holds_the_server_its_migrations_and_console_and_no_agent(debs):
    deb = debs["aus-server"]
    tree = packaged_tree(deb, "/usr/lib/aus-server/python")
    assert tree == source_tree(SERVER_MODULES)
    assert {"server/migrations/env.py", "server/migrations/script.py.mako",
            "server/console/index.html", "server/console/app.js"} <= tree
    assert any(re.fullmatch(r"server/migrations/versions/\d+_\w+\.py", p) for p in tree)
    listed = regular_files(deb)
    assert not [p for p in listed if re.search(r"/aus/(agent|cli)/", p)]
    # Only its own prefix: nothing of the agent's (unit, bpf sources, PAM hook, /etc/aus).
    # Its man page and completions: test_debian_manual.py; its unit and
    # user: tests/service/test_server_unit.py.
    listed -= {"/usr/share/man/man8/aus-server.8.gz", "/usr/share/zsh/vendor-completions/_aus-server",
               "/usr/share/bash-completion/completions/aus-server",
               "/lib/systemd/system/aus-server.service", "/usr/lib/sysusers.d/aus-server.conf"}
    assert all(p == "/usr/bin/aus-server" or p.startswith(("/usr/lib/aus-server/",
                                                            "/usr/share/doc/aus-server/"))
               for p in listed), sorted(listed)
    assert not KERNEL_DEPENDS & depends(deb)
    assert "aus" not in depends(deb)


def test_every_server_dependency_is_vendored_or_a_debian_dependency(debs):
    deb = debs["aus-server"]
    vendor, deps = vendored(deb, "/usr/lib/aus-server/vendor"), depends(deb)
    for dist in server_requirements():
        in_debian = DEBIAN_NAMES.get(dist, f"python3-{dist}") in deps
        assert (dist in vendor) != in_debian, f"{dist}: vendored {dist in vendor}, Debian {in_debian}"


def test_both_packages_install_side_by_side_sharing_no_file(debs):
    assert not regular_files(debs["aus"]) & regular_files(debs["aus-server"])


# ---- the server package runs on the system's python3 ----------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(root: Path) -> tuple[list[str], dict[str, str]]:
    """The command /usr/bin/aus-server runs, with its paths under ``root``."""
    wrapper = (root / "usr/bin/aus-server").read_text()
    pythonpath = re.search(r"^export PYTHONPATH=(\S+)$", wrapper, re.M).group(1)
    interpreter, module = re.search(r"^exec (\S+) -m (\S+) \"\$@\"$", wrapper, re.M).groups()
    assert interpreter == "/usr/bin/python3"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(root), "LANG": "C.UTF-8",
           "PYTHONPATH": ":".join(str(root) + p for p in pythonpath.split(":"))}
    return [interpreter, "-m", module], env


def test_extracted_server_package_runs_on_the_system_python(extracted_server):
    root = extracted_server
    cmd, env = _server_command(root)
    # Every module it loads comes from the package or from the system's
    # Python (the standard library, Debian's packages), never from the
    # source tree or a virtualenv.
    probe = subprocess.run(
        [cmd[0], "-c", "import json, sys, aus.server.cli, aus.server.app, uvicorn\n"
                       "print(json.dumps(sorted({getattr(m, '__file__', None) or ''"
                       " for m in list(sys.modules.values())} - {''})))"],
        env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr[-2000:]
    outside = [f for f in json.loads(probe.stdout)
               if not f.startswith((str(root) + "/usr/lib/aus-server/", "/usr/lib/python3"))]
    assert not outside, outside

    db = f"sqlite:///{root}/state/aus-server.db"
    create = subprocess.run(cmd + ["api-key", "create", "--org", "1", "--db", db], env=env,
                            capture_output=True, text=True, timeout=120)
    assert create.returncode == 0, create.stderr[-2000:]
    key = create.stdout.strip()
    key_id = key.split(":")[0]
    port = _free_port()
    server = subprocess.Popen(cmd + ["serve", "--listen", f"127.0.0.1:{port}", "--db", db],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        def whoami():
            assert server.poll() is None, server.stdout.read()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/whoami", headers={
                "Authorization": "Basic " + b64encode(key.encode()).decode()})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, json.load(r)
            except urllib.error.HTTPError:
                raise
            except OSError:
                return None     # not listening yet
        assert lab.wait_until(whoami, timeout=60, interval=0.2, what="aus-server answering") == \
            (200, {"org": "1", "key": key_id, "scopes": ["admin"]})
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)     # the server we started
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        server.stdout.close()


# ---- the agent package installs and enforces ---------------------------------

def test_package_builds_installs_runs_and_purges(debs, cg, peer, people):
    if installed():
        pytest.skip("an aus package is installed on this machine; not touching it")
    deb = debs["aus"]
    users, groups = people
    alice = users["alice"]
    try:
        p = subprocess.run(["apt-get", "install", "-y", "-q", str(deb)], capture_output=True,
                           text=True, timeout=600, env={"DEBIAN_FRONTEND": "noninteractive",
                                                        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        for path in ("/usr/bin/ausd", "/usr/bin/ausctl", "/lib/systemd/system/ausd.service",
                     "/usr/lib/aus/aus-pam-hook", "/usr/share/aus/bpf/aus.bpf.c", "/etc/aus/ausd.yaml"):
            assert Path(path).exists(), path
        assert not Path("/usr/lib/aus/python/aus/server").exists()
        with lab.ausd(cg, lab_policy(peer, groups)) as d:
            d.ausd_cmd = ("/usr/bin/ausd",)
            d.ausctl_cmd = ("/usr/bin/ausctl",)
            d.start()
            status = d.ctl_json("status")
            assert status["daemon"]["running"] and all(p["attached"] for p in status["programs"])
            with lab.session(d, alice.uid):
                assert lab.act(cg, "tcp", peer.v4, 80, loginuid=alice.uid, uid=alice.uid,
                               gid=alice.gid)["ok"]
                assert lab.act(cg, "tcp", peer.v4, 443, loginuid=alice.uid, uid=alice.uid,
                               gid=alice.gid)["errno"] == "EPERM"
                assert d.check(alice.uid, peer.v4, "tcp", 443)["allowed"] is False
    finally:
        subprocess.run(["apt-get", "purge", "-y", "-q", "aus"], capture_output=True, timeout=300,
                       env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert not installed()
    assert not Path("/usr/bin/ausd").exists()
