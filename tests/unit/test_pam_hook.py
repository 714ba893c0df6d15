"""The shipped PAM hook, run as pam_exec runs it: the program and the
timeout come from its arguments only, never from the (partly user-set) PAM
environment, and the program runs with an empty environment."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

HOOK = Path(__file__).resolve().parents[2] / "packaging" / "pam" / "aus-pam-hook"


def fake_ausctl(tmp_path: Path, name: str, body: str = "") -> Path:
    """A program that records its arguments and environment."""
    prog = tmp_path / name
    prog.write_text(f"#!/bin/sh\n{{ echo \"ARGS $*\"; /usr/bin/env; }} > {tmp_path / name}.out\n{body}")
    prog.chmod(0o755)
    return prog


def run_hook(args: list[str], env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    # pam_exec runs the hook with the PAM environment only.
    return subprocess.run([str(HOOK), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_program_and_timeout_come_from_arguments_and_run_with_an_empty_environment(tmp_path):
    good = fake_ausctl(tmp_path, "good")
    evil = fake_ausctl(tmp_path, "evil")
    env = {"PAM_TYPE": "open_session", "PAM_USER": "alice", "PAM_SERVICE": "sshd",
           "AUSCTL": str(evil), "AUS_PAM_TIMEOUT": "99", "PATH": f"{tmp_path}:/usr/bin:/bin",
           "LD_PRELOAD": "/nonexistent.so", "PYTHONPATH": str(tmp_path)}
    p = run_hook(["--timeout", "5", str(good), "--config", "/etc/aus/x.yaml"], env)
    assert p.returncode == 0 and "aus-pam-hook: sshd alice:" in p.stdout, (p.stdout, p.stderr)
    assert not (tmp_path / "evil.out").exists()
    out = (tmp_path / "good.out").read_text().splitlines()
    assert out[0] == "ARGS --config /etc/aus/x.yaml session open --timeout 5"
    names = {line.split("=", 1)[0] for line in out[1:]}
    assert names <= {"PATH", "PWD"}, out
    assert "PATH=/usr/sbin:/usr/bin:/sbin:/bin" in out
    # Without arguments: the default timeout, whatever AUS_PAM_TIMEOUT says.
    env["PAM_TYPE"] = "close_session"
    p = run_hook(["--", str(good)], env)
    assert p.returncode == 0
    assert (tmp_path / "good.out").read_text().splitlines()[0] == "ARGS session close --timeout 2"


def test_bad_timeout_is_reported_and_the_login_goes_on(tmp_path):
    good = fake_ausctl(tmp_path, "good")
    for bad in ("x", "0", "61", "08", ""):
        p = run_hook(["--timeout", bad, str(good)], {"PAM_TYPE": "open_session"})
        assert p.returncode == 0 and "--timeout takes whole seconds" in p.stderr, (bad, p.stderr)
    assert not (tmp_path / "good.out").exists()


def test_a_hanging_program_is_cut_off_by_the_timeout(tmp_path):
    slow = fake_ausctl(tmp_path, "slow", "exec sleep 100\n")
    t0 = time.monotonic()
    p = run_hook(["--timeout", "1", str(slow)], {"PAM_TYPE": "open_session", "PAM_USER": "bob"})
    took = time.monotonic() - t0
    assert p.returncode == 0 and "failed (exit 124)" in p.stderr, p.stderr
    assert took < 1 + 3 + 1 + 2, took


def test_other_pam_phases_run_nothing(tmp_path):
    good = fake_ausctl(tmp_path, "good")
    for phase in ("auth", "account", ""):
        assert run_hook([str(good)], {"PAM_TYPE": phase}).returncode == 0
    assert not (tmp_path / "good.out").exists()
    assert os.access(HOOK, os.X_OK)
