"""A fresh install as an administrator does it: the package with its own
/etc/aus/ausd.yaml and no policy yet. ausd is enabled but waits, inactive
and never in a restart loop, until a policy exists; then it starts in
visibility mode and logs what every login UID gets. ausd attaches to the
container's cgroup namespace root, a cgroup made for this test
(container.py), and blocks nothing (visibility)."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.support.polling import wait_until

from . import container

NO_POLICY = "ausd: not starting: no policy at /etc/aus/policy.yaml"


def state(m) -> dict[str, str]:
    return m.show("ausd", "ActiveState", "SubState", "Result", "NRestarts", "UnitFileState",
                  "MainPID")


def journal(m) -> str:
    return m.run("journalctl", "--no-pager", "-o", "cat", "-u", "ausd").stdout


@pytest.fixture(scope="module")
def fresh(deb):
    with container.machine(deb, {}) as m:
        try:
            install = m.run("apt-get", "install", "-y", "-q",
                            f"{container.GUEST_DIR}/{deb.name}", check=False, timeout=900)
            yield m, install
        finally:
            if m.leader:
                m.run("ausctl", "uninstall", "--yes", check=False)


def test_the_package_depends_on_the_python_its_wheels_were_built_for(deb):
    minor = subprocess.run(["/usr/bin/python3", "-c",
                            "import sys; print(*sys.version_info[:2])"],
                           capture_output=True, text=True, check=True).stdout.split()
    major, minor = int(minor[0]), int(minor[1])
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    assert depends.startswith(f"python3 (>= {major}.{minor}), python3 (<< {major}.{minor + 1}),")
    assert "linux-headers-amd64 | linux-headers-generic" in depends


def test_without_a_policy_ausd_is_enabled_but_waits_without_restarting(fresh):
    m, install = fresh
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert ("aus: ausd is enabled and starts once a policy exists: put one in "
            "/etc/aus/policy.yaml") in install.stdout + install.stderr
    s = state(m)
    assert s["UnitFileState"] == "enabled", s
    assert (s["ActiveState"], s["NRestarts"]) == ("inactive", "0"), s
    # A start asked for (as at boot) is skipped, never failed or retried.
    m.systemctl("start", "ausd", check=False)
    assert NO_POLICY in wait_until(lambda: journal(m) if NO_POLICY in journal(m) else "",
                                   timeout=30, what="the skipped start in the journal")
    time.sleep(3)
    s = state(m)
    assert (s["ActiveState"], s["NRestarts"], s["MainPID"]) == ("inactive", "0", "0"), s
    assert "Start request repeated too quickly" not in journal(m)
    assert not m.run("ls", "/sys/fs/bpf").stdout.split(), "something was loaded"


def test_with_a_policy_it_starts_in_visibility_mode_and_reports_login_uids(fresh):
    m, _ = fresh
    m.run("cp", "/usr/share/doc/aus/policy.example.yaml", "/etc/aus/policy.yaml")
    m.systemctl("start", "ausd")
    s = state(m)
    assert (s["ActiveState"], s["SubState"], s["NRestarts"]) == ("active", "running", "0"), s
    status = m.ausctl_json("status")
    assert (status["mode"], status["mode_source"]) == ("visibility", "config"), status
    assert status["policy"]["rules"] == 3, status["policy"]
    # Login UIDs with processes: a root session (unmanaged) and a user's
    # unknown to NSS (managed, baseline only). The report runs at start and
    # at each reload.
    units = {0: "aus-test-root-login", 4242: "aus-test-user-login"}
    try:
        for uid, unit in units.items():
            m.run("systemd-run", f"--unit={unit}", "--quiet", "/bin/sh", "-c",
                  f"echo {uid} > /proc/self/loginuid && exec sleep 600")
        # A reload reports what the last /proc scan saw: wait for the scan.
        wait_until(lambda: m.ausctl_json("status")["users"]["active"] == 1, 15, interval=0.2,
                   what="ausd to see the sessions")
        expected = ["login UID 0 (root): not managed (unmanaged_login_uids): never filtered",
                    "login UID 4242 (unknown to NSS): managed, no policy group, baseline only"]
        m.systemctl("reload", "ausd")

        def reported():
            j = journal(m)
            tail = j[j.rfind("Reloading ausd.service"):]
            return tail if all(e in tail for e in expected) else ""
        try:
            tail = wait_until(reported, timeout=30, interval=0.2,
                              what="the login report after the reload")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; ausd's journal:\n{journal(m)[-3000:]}") from None
        assert re.search(r"login UIDs with processes now: \d+ \(mode visibility: nothing "
                         r"is blocked", tail), tail[-3000:]
    finally:
        for unit in units.values():
            m.systemctl("stop", unit, check=False)
