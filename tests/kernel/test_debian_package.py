"""The Debian package builds with one command, installs with its
dependencies, and the installed ausd starts and enforces."""

import subprocess
from pathlib import Path

import pytest

from tests.support import lab

from .conftest import lab_policy

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]


def installed() -> bool:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "aus"], capture_output=True, text=True)
    return "install ok installed" in p.stdout


def test_package_builds_installs_runs_and_purges(cg, peer, people):
    if installed():
        pytest.skip("an aus package is installed on this machine; not touching it")
    build = subprocess.run([str(REPO / "packaging/debian/build.sh")], capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    deb = REPO / build.stdout.strip().splitlines()[-1]
    assert deb.exists() and deb.name.startswith("aus_")
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
