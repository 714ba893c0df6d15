"""Compile, load, pin and attach the kernel programs: the layer that touches bcc.

Pins under ``pin_dir``::

    <pin_dir>/v<ABI>/<map>        maps (kept across restarts and upgrades)
    <pin_dir>/v<ABI>/prog_<hook>  the programs currently attached
    <pin_dir>/v<ABI>/stage_<hook> a program just built, until taken over
    <pin_dir>/links/<hook>        cgroup links; they keep the programs
                                  attached while no ausd runs

A start always compiles the programs anew (the running kernel's BTF gives
``task_struct.loginuid``), reuses the pinned maps, and swaps each link to
the new program with BPF_LINK_UPDATE: enforcement never has a gap, and a
new version replaces the old programs atomically. bcc raises bare
``Exception``; every bcc call is made through :func:`_bcc` and becomes a
:class:`BpfError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import importlib.util
import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..core import contract as C
from ..core.errors import BpfError, LockError, ProbeError
from . import bpfsys, btf
from .config import DaemonConfig

log = logging.getLogger(__name__)

BPF_SRC = "aus.bpf.c"
CGROUP2_SUPER_MAGIC = 0x63677270
BPF_FS_MAGIC = 0xCAFE4A11

# bpf_prog_type / bpf_attach_type values from uapi/linux/bpf.h.
_PROG_CGROUP_SKB = 8
_PROG_CGROUP_SOCK = 9
_PROG_CGROUP_SOCK_ADDR = 18


@dataclass(frozen=True)
class Hook:
    link: str          # pin name of the link and program
    func: str          # C function
    prog_type: int
    attach_type: int


# Attached in this order: the per-packet backstop first, identity last, so
# a first install never has a moment with sockets judged by a half set.
HOOKS = (
    Hook("egress", "aus_egress", _PROG_CGROUP_SKB, 1),
    Hook("connect4", "aus_connect4", _PROG_CGROUP_SOCK_ADDR, 10),
    Hook("connect6", "aus_connect6", _PROG_CGROUP_SOCK_ADDR, 11),
    Hook("sendmsg4", "aus_sendmsg4", _PROG_CGROUP_SOCK_ADDR, 14),
    Hook("sendmsg6", "aus_sendmsg6", _PROG_CGROUP_SOCK_ADDR, 15),
    Hook("sock_create", "aus_sock_create", _PROG_CGROUP_SOCK, 2),
)

# Which maps are per-CPU, and their key/value mirrors.
MAP_TYPES = {
    C.MAP_CONFIG: (ctypes.c_uint32, C.Config, False),
    C.MAP_USERS: (ctypes.c_uint32, C.User, False),
    C.MAP_DST: (C.DstKey, C.DstVal, False),
    C.MAP_SVC: (C.SvcKey, C.SvcVal, False),
    C.MAP_USER_STATS: (ctypes.c_uint32, C.Counters, True),
    C.MAP_RULE_STATS: (ctypes.c_uint32, C.Counters, True),
    C.MAP_REASONS: (ctypes.c_uint32, ctypes.c_uint64, True),
    C.MAP_STATS: (ctypes.c_uint32, ctypes.c_uint64, True),
    C.MAP_RULES: (ctypes.c_uint32, C.RuleInfo, False),
    C.MAP_RATELIMIT: (ctypes.c_uint32, C.Bucket, True),
}


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


def default_bpf_dir() -> Path:
    """The C sources: the source tree's bpf/, else the installed copy."""
    tree = Path(__file__).resolve().parents[3] / "bpf"
    if (tree / BPF_SRC).exists():
        return tree
    return Path("/usr/share/aus/bpf")


# ---- probing -------------------------------------------------------------

def _statfs_type(path: Path) -> int | None:
    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(str(path)), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def ensure_bpffs(pin_dir: Path) -> None:
    """Mount bpffs at /sys/fs/bpf when the pin dir lies there unmounted."""
    root = Path("/sys/fs/bpf")
    if pin_dir.is_relative_to(root) and _statfs_type(root) != BPF_FS_MAGIC:
        log.info("mounting bpffs at %s", root)
        res = subprocess.run(["mount", "-t", "bpf", "bpf", str(root)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise ProbeError(f"bpffs is not mounted at {root} and mounting it failed "
                             f"({res.stderr.strip()}); mount it with: mount -t bpf bpf {root}")
    parent = pin_dir
    while not parent.exists():
        parent = parent.parent
    if _statfs_type(parent) != BPF_FS_MAGIC and not (
            parent == pin_dir.parent or _statfs_type(pin_dir.parent) == BPF_FS_MAGIC):
        raise ProbeError(f"pin_dir {pin_dir} is not on a bpf filesystem; "
                         "mount one with: mount -t bpf bpf /sys/fs/bpf")


def probe(cfg: DaemonConfig) -> int:
    """Check once that this kernel can run the programs; returns the loginuid
    offset. Each failure is one sentence naming what is missing and the fix."""
    if os.geteuid() != 0:
        raise ProbeError("ausd must run as root (it needs CAP_BPF, CAP_NET_ADMIN "
                         "and CAP_SYS_ADMIN to load cgroup programs).")
    # Found, not imported: only the build process loads bcc (and LLVM).
    if importlib.util.find_spec("bcc") is None:
        raise ProbeError("the bcc Python module is missing; install it with: "
                         "apt-get install python3-bpfcc (and run ausd from a venv "
                         "made with --system-site-packages)")
    build = Path("/lib/modules") / platform.release() / "build"
    if not (build / "include").exists():
        raise ProbeError(f"kernel headers are missing at {build}; install "
                         "linux-headers-amd64 and link them (scripts/setup.sh does it)")
    if not Path(btf.DEFAULT_VMLINUX).exists():
        raise ProbeError(f"{btf.DEFAULT_VMLINUX} is missing; ausd needs a kernel "
                         "built with CONFIG_DEBUG_INFO_BTF=y")
    cgroup = cfg.cgroup_path
    if _statfs_type(cgroup) != CGROUP2_SUPER_MAGIC:
        raise ProbeError(f"{cgroup} is not a cgroup v2 directory; set `cgroup` in "
                         "ausd.yaml to one (see /proc/mounts for cgroup2)")
    ensure_bpffs(cfg.pin_dir)
    offset = btf.member_offset("task_struct", "loginuid")
    if btf.member_size("task_struct", "loginuid") != 4:
        raise ProbeError("task_struct.loginuid is not 4 bytes in this kernel's BTF; "
                         "this kernel is not supported")
    return offset


# ---- the pin-dir lock ------------------------------------------------------

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


# ---- compile and load ------------------------------------------------------

def _bcc(op: str, obj: str, fn, *args, **kwargs):
    """Run one bcc call; bcc raises bare Exception, this raises BpfError."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - bcc gives nothing narrower
        err = getattr(exc, "errno", None)
        text = str(exc)
        for code in errno.errorcode:
            if os.strerror(code) in text:
                err = err or code
                break
        raise BpfError(op, obj, err, text.splitlines()[0] if text else "") from exc


def cflags(cfg: DaemonConfig, loginuid_offset: int, bpf_dir: Path) -> list[str]:
    layout = PinLayout(cfg.pin_dir)
    return [
        f"-I{bpf_dir}",
        f"-DAUS_LOGINUID_OFFSET={loginuid_offset}",
        f'-DAUS_PIN_MAPS="{layout.maps_dir}"',
        f"-DAUS_MAX_USERS={cfg.max_users}",
        f"-DAUS_MAX_DESTINATIONS={cfg.max_destinations}",
        f"-DAUS_MAX_SERVICES={cfg.max_services}",
        f"-DAUS_MAX_RULES={cfg.max_rules}",
        "-Wno-unused-function",
    ]


@dataclass
class Loaded:
    """The loaded programs (by fd) and the pinned maps they use."""
    prog_fds: dict[str, int]
    layout: PinLayout
    maps: dict[str, bpfsys.Map] = field(default_factory=dict)
    adopted: bool = False            # links were there already

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        for fd in self.prog_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.prog_fds.clear()


def _build(cfg: DaemonConfig, loginuid_offset: int, layout: PinLayout) -> None:
    """Compile with bcc and load every program, pinning each under a
    staging name. Runs in a child process: bcc and LLVM stay out of the
    daemon's memory, and the pins outlive the child."""
    from bcc import BPF

    bpf_dir = cfg.bpf_dir or default_bpf_dir()
    src = bpf_dir / BPF_SRC
    if not src.exists():
        raise ProbeError(f"the kernel program source {src} is missing; "
                         "reinstall aus or set bpf_dir in ausd.yaml")
    flags = cflags(cfg, loginuid_offset, bpf_dir)
    bpf = _bcc("compile", str(src), BPF, src_file=str(src).encode(), cflags=flags)
    for hook in HOOKS:
        fn = _bcc("load", hook.func, bpf.load_func, hook.func.encode(),
                  hook.prog_type, attach_type=hook.attach_type)
        _repin(fn.fd, layout.stage(hook.link))


def compile_and_load(cfg: DaemonConfig, loginuid_offset: int) -> Loaded:
    """Build the programs in a child process and take them over by pin."""
    layout = PinLayout(cfg.pin_dir)
    layout.maps_dir.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: build, report, leave without cleanup handlers
        code = 0
        try:
            os.close(r)
            _build(cfg, loginuid_offset, layout)
            os.write(w, b"{}")
        except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent
            os.write(w, json.dumps(_describe(exc)).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read()
    os.waitpid(pid, 0)
    failure = json.loads(report or b'{"kind": "BpfError", "op": "compile", "obj": "programs",'
                                  b' "errno": null, "text": "the build process died"}')
    if failure:
        raise _rebuild(failure)
    fds: dict[str, int] = {}
    try:
        for hook in HOOKS:
            stage = layout.stage(hook.link)
            fds[hook.link] = bpfsys.obj_get(str(stage))
            stage.unlink()
        loaded = Loaded(prog_fds=fds, layout=layout)
        loaded.maps = open_maps(layout)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return loaded


def _describe(exc: BaseException) -> dict:
    if isinstance(exc, BpfError):
        return {"kind": "BpfError", "op": exc.op, "obj": exc.obj, "errno": exc.errno,
                "text": str(exc)}
    kind = "ProbeError" if isinstance(exc, ProbeError) else "BpfError"
    return {"kind": kind, "op": "compile", "obj": "programs", "errno": None,
            "text": f"{type(exc).__name__}: {exc}"}


def _rebuild(d: dict) -> Exception:
    if d["kind"] == "ProbeError":
        return ProbeError(d["text"])
    err = BpfError(d["op"], d["obj"], d["errno"])
    err.args = (d["text"],)
    return err


def open_maps(layout: PinLayout, names=None) -> dict[str, bpfsys.Map]:
    maps = {}
    try:
        for name in names or MAP_TYPES:
            key_t, val_t, percpu = MAP_TYPES[name]
            maps[name] = bpfsys.Map.open(str(layout.map(name)), key_t, val_t, percpu)
    except BaseException:
        for m in maps.values():
            m.close()
        raise
    return maps


def attach(loaded: Loaded, cgroup: Path) -> None:
    """Attach every program to ``cgroup`` through pinned links, swapping the
    program of an existing link in place (no gap) when one is pinned."""
    layout = loaded.layout
    layout.links_dir.mkdir(parents=True, exist_ok=True)
    cgroup_id = os.stat(cgroup).st_ino
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    adopted = 0
    try:
        for hook in HOOKS:
            prog_fd = loaded.prog_fds[hook.link]
            link_path = layout.link(hook.link)
            old_fd = -1
            if link_path.exists():
                old_fd = bpfsys.obj_get(str(link_path))
                info = bpfsys.link_info(old_fd, str(link_path))
                if info["cgroup_id"] == cgroup_id:
                    bpfsys.link_update(old_fd, prog_fd, str(link_path))
                    os.close(old_fd)
                    adopted += 1
                    _repin(prog_fd, layout.prog(hook.link))
                    continue
            # New link (first start, or the cgroup changed in ausd.yaml).
            link_fd = bpfsys.link_create(prog_fd, cg_fd, hook.attach_type,
                                         f"{hook.link} to {cgroup}")
            tmp = link_path.with_name(link_path.name + "_new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            bpfsys.obj_pin(link_fd, str(tmp))
            os.replace(tmp, link_path)
            os.close(link_fd)
            if old_fd >= 0:
                bpfsys.link_detach(old_fd, f"old {hook.link}")
                os.close(old_fd)
            _repin(prog_fd, layout.prog(hook.link))
    finally:
        os.close(cg_fd)
    loaded.adopted = adopted == len(HOOKS)
    _remove_old_abi(layout)
    log.info("programs attached to %s (%s)", cgroup,
             "replaced in place" if loaded.adopted else "new links")


def _remove_old_abi(layout: PinLayout) -> None:
    """After an upgrade to a new map layout the programs use the new maps;
    the old version's pins only hold memory."""
    for d in layout.pin_dir.glob("v*"):
        if d.is_dir() and d != layout.maps_dir and d.name[1:].isdigit():
            for p in d.iterdir():
                p.unlink()
            d.rmdir()
            log.info("removed the pins of map layout %s", d.name)


def _repin(fd: int, path: Path) -> None:
    tmp = path.with_name(path.name + "_new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    bpfsys.obj_pin(fd, str(tmp))
    os.replace(tmp, path)


def is_installed(pin_dir: Path) -> bool:
    layout = PinLayout(pin_dir)
    return all(layout.link(h.link).exists() for h in HOOKS)


def uninstall(pin_dir: Path) -> list[str]:
    """Detach every program and remove every pin: enforcement ends here."""
    layout = PinLayout(pin_dir)
    removed = []
    for hook in HOOKS:
        path = layout.link(hook.link)
        if path.exists():
            fd = bpfsys.obj_get(str(path))
            try:
                bpfsys.link_detach(fd, hook.link)
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
