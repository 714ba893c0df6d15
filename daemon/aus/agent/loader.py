"""Compile, load and attach the kernel programs: the layer that touches bcc.

A start compiles the programs anew (the running kernel's BTF gives
``task_struct.loginuid``), reuses the pinned maps (see :mod:`.pins` for
the layout), and swaps each link to the new program with
BPF_LINK_UPDATE: enforcement never has a gap, and a new version replaces
the old programs atomically. A restart whose programs would be built from
the same sources, flags, kernel and version as the attached ones (their
build pin says so) takes the attached programs instead of compiling: the
second bcc/LLVM needs is most of a restart. bcc raises bare ``Exception``; every bcc call
is made through :func:`_bcc` and becomes a :class:`BpfError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..core import contract as C
from ..core.errors import BpfError, ProbeError
from . import bpfsys, btf, pins
from .config import DaemonConfig

log = logging.getLogger(__name__)

BPF_SRC = "aus.bpf.c"
CGROUP2_SUPER_MAGIC = 0x63677270
BPF_FS_MAGIC = 0xCAFE4A11


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
    bpfsys.bpf_syscall_number()   # an architecture aus knows
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
    layout = pins.PinLayout(cfg.pin_dir)
    return [
        f"-I{bpf_dir}",
        f"-DAUS_LOGINUID_OFFSET={loginuid_offset}",
        f'-DAUS_PIN_MAPS="{layout.maps_dir}"',
        f"-DAUS_MAX_USERS={cfg.max_users}",
        f"-DAUS_MAX_DESTINATIONS={cfg.max_destinations}",
        f"-DAUS_MAX_SERVICES={cfg.max_services}",
        f"-DAUS_MAX_RULES={cfg.max_rules}",
        f"-DAUS_MAX_DNS_ENTRIES={cfg.max_dns_entries}",
        "-Wno-unused-function",
    ]


@dataclass
class Loaded:
    """The loaded programs (by fd) and the pinned maps they use."""
    prog_fds: dict[str, int]
    layout: pins.PinLayout
    maps: dict[str, bpfsys.Map] = field(default_factory=dict)
    adopted: bool = False            # links were there already
    build_id: str = ""               # what the programs are built from
    reused: bool = False             # the attached programs, not compiled now

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        for fd in self.prog_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.prog_fds.clear()


def _build(cfg: DaemonConfig, loginuid_offset: int, layout: pins.PinLayout) -> None:
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
    for prog in C.PROGRAMS:
        fn = _bcc("load", prog.func, bpf.load_func, prog.func.encode(),
                  prog.prog_type, attach_type=prog.attach_type)
        pins.repin(fn.fd, layout.stage(prog.link))


def build_id(cfg: DaemonConfig, loginuid_offset: int) -> str:
    """A digest of everything the programs are built from: the C sources,
    the flags (sizes, pin paths, the loginuid offset), the kernel and
    this version of aus."""
    bpf_dir = cfg.bpf_dir or default_bpf_dir()
    h = hashlib.sha256()
    for f in sorted(bpf_dir.iterdir()):
        if f.is_file() and f.suffix in (".c", ".h"):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(json.dumps(cflags(cfg, loginuid_offset, bpf_dir)).encode())
    h.update(f"{platform.release()} {platform.version()} {__version__}".encode())
    return h.hexdigest()[:32]


def _attached(layout: pins.PinLayout, cgroup: Path, build: str) -> dict[str, int] | None:
    """The attached programs' fds, if they are of this build and each is
    what its link to ``cgroup`` runs; else None."""
    if not layout.build(build).exists():
        return None
    cgroup_id = os.stat(cgroup).st_ino
    fds: dict[str, int] = {}
    try:
        for hook in C.PROGRAMS:
            fd = bpfsys.obj_get(str(layout.prog(hook.link)))
            fds[hook.link] = fd
            link_fd = bpfsys.obj_get(str(layout.link(hook.link)))
            try:
                link = bpfsys.link_info(link_fd, hook.link)
            finally:
                os.close(link_fd)
            if (link["cgroup_id"] != cgroup_id
                    or link["prog_id"] != bpfsys.prog_info(fd, hook.link)["id"]):
                raise BpfError("adopt", hook.link, None, "not the pinned program")
    except (BpfError, OSError):
        for fd in fds.values():
            os.close(fd)
        return None
    return fds


def compile_and_load(cfg: DaemonConfig, loginuid_offset: int) -> Loaded:
    """Build the programs in a child process and take them over by pin;
    or take the attached ones, when they are of this very build."""
    layout = pins.PinLayout(cfg.pin_dir)
    layout.maps_dir.mkdir(parents=True, exist_ok=True)
    build = build_id(cfg, loginuid_offset)
    fds = _attached(layout, cfg.cgroup_path, build)
    if fds is not None:
        try:
            loaded = Loaded(prog_fds=fds, layout=layout, build_id=build, reused=True)
            loaded.maps = pins.open_maps(layout)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        log.info("programs of build %s are attached already: taken as they are", build)
        return loaded
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
        for prog in C.PROGRAMS:
            stage = layout.stage(prog.link)
            fds[prog.link] = bpfsys.obj_get(str(stage))
            stage.unlink()
        loaded = Loaded(prog_fds=fds, layout=layout, build_id=build)
        loaded.maps = pins.open_maps(layout)
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


def _mark_build(layout: pins.PinLayout, loaded: Loaded) -> None:
    """Name the attached programs' build by a pin (any of the programs
    does: only the name is read), and drop the names of other builds."""
    mark = layout.build(loaded.build_id)
    if not mark.exists():
        pins.repin(loaded.prog_fds[C.PROGRAMS[0].link], mark)
    for old in layout.maps_dir.glob("build_*"):
        if old != mark:
            old.unlink()


def attach(loaded: Loaded, cgroup: Path) -> None:
    """Attach every program to ``cgroup`` through pinned links, swapping the
    program of an existing link in place (no gap) when one is pinned."""
    layout = loaded.layout
    layout.links_dir.mkdir(parents=True, exist_ok=True)
    cgroup_id = os.stat(cgroup).st_ino
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    adopted = 0
    try:
        for hook in C.PROGRAMS:
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
                    pins.repin(prog_fd, layout.prog(hook.link))
                    continue
            # New link (first start, or the cgroup changed in ausd.yaml).
            link_fd = bpfsys.link_create(prog_fd, cg_fd, hook.attach_type,
                                         f"{hook.link} to {cgroup}")
            pins.repin(link_fd, link_path)
            os.close(link_fd)
            if old_fd >= 0:
                bpfsys.link_detach(old_fd, f"old {hook.link}")
                os.close(old_fd)
            pins.repin(prog_fd, layout.prog(hook.link))
    finally:
        os.close(cg_fd)
    loaded.adopted = adopted == len(C.PROGRAMS)
    if loaded.build_id:
        _mark_build(layout, loaded)
    for old in pins.remove_other_abis(layout):
        log.info("removed the pins of map layout %s", old)
    log.info("programs attached to %s (%s)", cgroup,
             "replaced in place" if loaded.adopted else "new links")
