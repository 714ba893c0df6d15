"""Where the pins live, and opening them, checked against the contract.

Pins under ``pin_dir``::

    <pin_dir>/v<ABI>/<map>        maps (kept across restarts and upgrades)
    <pin_dir>/v<ABI>/prog_<hook>  the programs currently attached
    <pin_dir>/v<ABI>/stage_<hook> a program just built, until taken over
    <pin_dir>/v<ABI>/build_<id>   the attached programs' build (a program
                                  pinned under a name that says its sources)
    <pin_dir>/links/<hook>        cgroup links; they keep the programs
                                  attached while no ausd runs

Everything that reads or removes pins goes through here: ``ausctl`` opens
the maps with :func:`pinned_maps` while the daemon is down, and a map
whose type or key/value sizes differ from ``contract.MAPS`` is refused
instead of being read with the wrong layout.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core import contract as C
from ..core.errors import AusError, BpfError, LockError
from . import bpfsys


@dataclass(frozen=True)
class PinLayout:
    pin_dir: Path

    @property
    def maps_dir(self) -> Path:
        return self.pin_dir / f"v{C.ABI_VERSION}"

    @property
    def links_dir(self) -> Path:
        return self.pin_dir / "links"

    def map(self, name: str) -> Path:
        return self.maps_dir / name

    def link(self, hook: str) -> Path:
        return self.links_dir / hook

    def prog(self, hook: str) -> Path:
        return self.maps_dir / f"prog_{hook}"

    def stage(self, hook: str) -> Path:
        return self.maps_dir / f"stage_{hook}"

    def build(self, build_id: str) -> Path:
        """A pin whose name says what the attached programs were built
        from (see loader.build_id)."""
        return self.maps_dir / f"build_{build_id}"


# The maps read and written through bpf(2); aus_sock and aus_events are
# the programs' own (socket storage, and a ring read by ringbuf.py).
LOOKUP_MAPS = tuple(name for name, spec in C.MAPS.items() if spec.value is not None
                    and spec.map_type != C.MAP_TYPE_SK_STORAGE)


def open_map(layout: PinLayout, spec: C.MapSpec) -> bpfsys.Map:
    """Open one pinned map; refuse it unless its type and key/value sizes
    are those of ``spec`` (a map of another layout read with this one's
    structs would be decoded into nonsense)."""
    path = str(layout.map(spec.name))
    m = bpfsys.Map.open(path, spec.key, spec.value, spec.percpu)
    info = bpfsys.map_info(m.fd, path)
    if info["type"] != spec.map_type:
        m.close()
        raise BpfError("open pinned", path, errno.EPROTO,
                       f"map type {info['type']} differs from this version's "
                       f"{spec.map_type}")
    return m


def open_maps(layout: PinLayout, names=None) -> dict[str, bpfsys.Map]:
    maps: dict[str, bpfsys.Map] = {}
    try:
        for name in names or LOOKUP_MAPS:
            maps[name] = open_map(layout, C.MAPS[name])
    except BaseException:
        close_maps(maps)
        raise
    return maps


def close_maps(maps: dict[str, bpfsys.Map]) -> None:
    for m in maps.values():
        m.close()


@contextlib.contextmanager
def pinned_maps(pin_dir: Path) -> Iterator[dict[str, bpfsys.Map]]:
    """The pinned maps of an installed ausd, closed on exit."""
    layout = PinLayout(pin_dir)
    if not layout.map(C.MAP_USERS).exists():
        raise AusError(f"no aus maps are pinned under {layout.maps_dir}; "
                       "is ausd installed and started with this pin_dir?")
    maps = open_maps(layout)
    try:
        yield maps
    finally:
        close_maps(maps)


def repin(fd: int, path: Path) -> None:
    """Pin ``fd`` at ``path``, replacing what is there in one rename."""
    tmp = path.with_name(path.name + "_new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    bpfsys.obj_pin(fd, str(tmp))
    os.replace(tmp, path)


def program_ids(layout: PinLayout) -> list[dict]:
    """Each hook's pinned program (id, tag) and whether its link is pinned."""
    out = []
    for prog in C.PROGRAMS:
        try:
            fd = bpfsys.obj_get(str(layout.prog(prog.link)))
        except BpfError:
            out.append({"hook": prog.link, "attached": False})
            continue
        try:
            info = bpfsys.prog_info(fd, prog.link)
        finally:
            os.close(fd)
        out.append({"hook": prog.link, "attached": layout.link(prog.link).exists(),
                    "prog_id": info["id"], "tag": info["tag"]})
    return out


def remove_other_abis(layout: PinLayout) -> list[str]:
    """After an upgrade to a new map layout the programs use the new maps;
    the old version's pins only hold memory."""
    removed = []
    for d in layout.pin_dir.glob("v*"):
        if d.is_dir() and d != layout.maps_dir and d.name[1:].isdigit():
            for p in d.iterdir():
                p.unlink()
            d.rmdir()
            removed.append(d.name)
    return removed


def is_installed(pin_dir: Path) -> bool:
    layout = PinLayout(pin_dir)
    return all(layout.link(p.link).exists() for p in C.PROGRAMS)


def uninstall(pin_dir: Path) -> list[str]:
    """Detach every program and remove every pin: enforcement ends here."""
    layout = PinLayout(pin_dir)
    removed = []
    for prog in C.PROGRAMS:
        path = layout.link(prog.link)
        if path.exists():
            fd = bpfsys.obj_get(str(path))
            try:
                bpfsys.link_detach(fd, prog.link)
            finally:
                os.close(fd)
            path.unlink()
            removed.append(str(path))
    if pin_dir.exists():
        for p in sorted(pin_dir.rglob("*"), key=lambda p: -len(p.parts)):
            if p.is_dir():
                p.rmdir()
            else:
                p.unlink()
            removed.append(str(p))
        pin_dir.rmdir()
    return removed


class PinLock:
    """flock on the pin dir: one ausd per set of pins."""

    def __init__(self, pin_dir: Path):
        self.pin_dir = pin_dir
        self.fd = -1

    def acquire(self) -> None:
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.pin_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self.fd)
            self.fd = -1
            raise LockError(f"another ausd is already running on {self.pin_dir}; "
                            "stop it first (systemctl stop ausd)") from exc

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
