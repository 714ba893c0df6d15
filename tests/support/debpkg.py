"""The Debian packages: built by the one command (packaging/debian/build.sh),
and what a built package holds, as dpkg lists it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def files(deb: Path) -> dict[str, str]:
    """``dpkg -c``: path (without the leading '.') -> its mode string."""
    out = subprocess.run(["dpkg", "-c", str(deb)], capture_output=True, text=True,
                         check=True).stdout
    listing = {}
    for line in out.splitlines():
        mode, _owner, _size, _date, _time, path = line.split(maxsplit=5)
        listing[path.split(" -> ")[0].removeprefix(".")] = mode
    return listing


REPO = Path(__file__).resolve().parents[2]


def build() -> dict[str, Path]:
    """Both packages, built by the one command, by package name."""
    done = subprocess.run([str(REPO / "packaging/debian/build.sh")], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    out = {}
    for line in done.stdout.split():
        deb = REPO / line
        assert deb.exists(), line
        out[deb.name.split("_")[0]] = deb
    assert set(out) == {"aus", "aus-server"}, done.stdout
    return out
