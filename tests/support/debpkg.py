"""What a built Debian package holds, as dpkg lists it."""

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
