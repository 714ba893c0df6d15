"""Files only root reads, written so that no reader sees half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, body: bytes, tmp: Path, *, sync_dir: bool = True) -> None:
    """Write ``body`` to ``tmp`` (mode 0600, never through a link), fsync,
    rename it to ``path``, and with ``sync_dir`` fsync the directory so the
    rename survives a crash. ``tmp`` is removed on failure. Raises OSError."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.fchmod(fd, 0o600)   # O_CREAT's mode does not apply to a leftover
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if sync_dir:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
