"""scripts/setup.sh on a system without apt-get: it says what aus needs,
by purpose, and exits 1 before changing anything."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def path_without(tmp_path: Path, *hidden: str) -> str:
    """A PATH of one directory linking every command of the system's PATH
    but ``hidden``: a system where those are not installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in SYSTEM_PATH:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            link = bin_dir / name
            if name not in hidden and not link.exists():
                link.symlink_to(Path(d) / name)
    return str(bin_dir)


def setup(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts/setup.sh")], capture_output=True,
                          text=True, timeout=60, env={"PATH": path, "LANG": "C.UTF-8"})


def test_no_apt_and_a_missing_tool_names_what_is_needed_and_exits_1(tmp_path):
    p = setup(path_without(tmp_path, "apt-get", "bpftool"))
    assert p.returncode == 1, p.stdout + p.stderr
    err = p.stderr
    assert "setup: this system has no apt-get" in err
    assert "  - the command bpftool\n" in err
    # every purpose, with the package names, the running kernel's headers too
    for line in ("the eBPF compiler, for Python (bcc):      python3-bpfcc",
                 f"the running kernel's headers, for bcc:   linux-headers-{platform.release()}",
                 "inspecting BPF programs and maps:        bpftool"):
        assert line in err, err
    assert "Traceback" not in err and "apt-get: command not found" not in err
    assert not p.stdout


def test_no_apt_with_everything_present_goes_on(tmp_path):
    # dpkg-query hidden as well: a system with no Debian tooling at all.
    # Only the script's package part runs (up to its first unindented
    # `fi`): the rest would build the virtualenv.
    p = subprocess.run(
        ["bash", "-c", 'sed -n "1,/^fi$/p" "$0" | sed "/^set -euo/a cd $1" | bash',
         str(REPO / "scripts/setup.sh"), str(REPO)],
        capture_output=True, text=True, timeout=60,
        env={"PATH": path_without(tmp_path, "apt-get", "dpkg-query"), "LANG": "C.UTF-8"})
    assert p.returncode == 0, p.stderr
    assert "setup: no apt-get; everything aus needs is present, installing nothing" in p.stdout
