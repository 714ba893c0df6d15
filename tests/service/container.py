"""A Debian 12 machine booted with systemd in a container, for testing the
package's systemd unit for real.

    base rootfs   debootstrap (minbase + systemd), cached under
                  /var/cache/aus-tests keyed by suite and package list;
                  each run boots a copy in a temporary directory
    apt archives  the .debs apt fetched, cached beside it and bound into
                  the container, so a rerun downloads nothing
    cgroup        systemd-nspawn runs in a cgroup made here (a child of the
                  cgroup2 root); the container's cgroup namespace root is
                  its ``payload`` child, so whatever the container
                  attaches to "its" cgroup2 root lands there, never on the
                  host's root
    bpffs         the container gets an empty /sys/fs/bpf mount point of
                  its own; a bpffs mounted there lives and dies with it

Cleanup (``Machine.close``) stops the container, kills by PID whatever
is left in our cgroup (all of it started by our nspawn), removes the
cgroups (cgroup2 and the name=systemd mirror nspawn makes on hybrid
hosts), the directories nspawn made under /run/systemd/nspawn, and the
temporary root.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from aus.agent.config import cgroup2_root

CACHE = Path("/var/cache/aus-tests")
SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus")
NSPAWN_RUN = Path("/run/systemd/nspawn")
LEGACY_SYSTEMD_HIERARCHY = Path("/sys/fs/cgroup/systemd")
# Inside the container: where the test's files go.
GUEST_DIR = "/opt/aus-test"
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


def run(*cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


# ---- the cached base root -----------------------------------------------------

def host_mirror() -> str | None:
    """The Debian mirror this machine's apt uses for the suite, if any."""
    sources = Path("/etc/apt/sources.list.d")
    for f in sorted(sources.glob("*.sources")):
        for stanza in f.read_text().split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith((" ", "#")):
                    fields[key.strip()] = value.split()
            if (SUITE in fields.get("Suites", []) and "main" in fields.get("Components", [])
                    and "deb" in fields.get("Types", [])):
                return fields["URIs"][0]
    lists = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]
    for f in lists:
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
            if m and m.group(2) == SUITE and "main" in m.group(3).split():
                return m.group(1)
    return None


def base_rootfs() -> Path:
    """The debootstrapped root for SUITE with BASE_PACKAGES, built once."""
    key = hashlib.sha256(f"{SUITE} minbase {' '.join(sorted(BASE_PACKAGES))}".encode()).hexdigest()
    root = CACHE / f"rootfs-{key[:16]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "usr/lib/systemd/systemd").exists():
            return root
        tmp = CACHE / f"{root.name}.partial-{secrets.token_hex(3)}"
        try:
            mirror = host_mirror()
            run("debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                SUITE, str(tmp), *([mirror] if mirror else []), timeout=1200)
            # Downloaded .debs are kept in the shared archive, not the image.
            for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            tmp.rename(root)
        finally:
            if tmp.exists():
                _remove_tree(tmp)
    return root


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


def _remove_tree(path: Path) -> None:
    """rm -rf that refuses to descend into anything mounted below ``path``
    (a bind of a host directory must never be emptied)."""
    mounts = _mounts_under(path)
    if mounts:
        raise AssertionError(f"not removing {path}: mounts below it: {mounts}")
    shutil.rmtree(path)


# ---- cgroups ----------------------------------------------------------------

def _cgroup_hierarchies() -> list[Path]:
    roots = [cgroup2_root()]
    if os.path.ismount(LEGACY_SYSTEMD_HIERARCHY) and LEGACY_SYSTEMD_HIERARCHY not in roots:
        roots.append(LEGACY_SYSTEMD_HIERARCHY)
    return roots


def _pids_below(path: Path) -> list[int]:
    pids = []
    for procs in path.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def _remove_cgroup_tree(path: Path) -> None:
    if not path.exists():
        return
    for _ in range(200):
        pids = _pids_below(path)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    path.rmdir()


# ---- the machine ----------------------------------------------------------------

@dataclass
class Machine:
    name: str
    workdir: Path                 # temporary: the root and the logs
    cgroup: Path                  # host side: nspawn's cgroup (made here)
    archives: Path
    proc: subprocess.Popen | None = None
    leader: int = 0               # host PID of the container's systemd
    nspawn_dirs_before: set[str] = field(default_factory=set)

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def payload_cgroup(self) -> Path:
        """The host path of the container's cgroup namespace root."""
        return self.cgroup / "payload"

    # -- commands inside
    def run(self, *cmd: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        assert self.leader, "the container is not running"
        return run("nsenter", f"--target={self.leader}", "--all", "--", "/usr/bin/env", "-i",
                   *[f"{k}={v}" for k, v in GUEST_ENV.items()], *cmd,
                   check=check, timeout=timeout, input=input)

    def write(self, path: str, text: str) -> None:
        self.run("/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path,
                 input=text)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 240):
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, invocation: str) -> str:
        return self.run("journalctl", f"_SYSTEMD_INVOCATION_ID={invocation}", "--no-pager",
                        "-o", "cat", check=False).stdout

    def ausctl_json(self, *args: str) -> dict:
        return json.loads(self.run("ausctl", *args, "--json").stdout)

    # -- lifecycle
    def _nspawn(self, *args: str) -> list[str]:
        return ["systemd-nspawn", "--quiet", f"--directory={self.root}", "--register=no",
                "--keep-unit", f"--bind={self.archives}:/var/cache/apt/archives", *args]

    def _join_cgroup(self):
        procs = self.cgroup / "cgroup.procs"

        def pre():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return pre

    def prepare(self, base: Path, deb: Path, files: dict[str, Path],
                packages: tuple[str, ...] = ()) -> None:
        """Copy the base root, put the test's files in GUEST_DIR, and fetch
        (with the host's network, before boot) every .deb that installing
        ``deb`` and ``packages`` needs, into the shared archive."""
        run("cp", "-a", "--reflink=auto", str(base), str(self.root), timeout=600)
        guest = self.root / GUEST_DIR.lstrip("/")
        assert not any(p.is_symlink() for p in (guest.parent, guest))
        guest.mkdir(parents=True)
        for name, src in {deb.name: deb, **files}.items():
            shutil.copyfile(src, guest / name)
        cmd = (f"apt-get update -q && apt-get install -y -q --download-only "
               f"{GUEST_DIR}/{deb.name} {' '.join(packages)}")
        # The archive is shared: a container of another test run may hold
        # its lock for a while (apt-get install inside it); wait for it.
        deadline = time.monotonic() + 600
        while True:
            p = subprocess.run(self._nspawn(f"--machine={self.name}-apt", "--pipe",
                                            "--setenv=DEBIAN_FRONTEND=noninteractive",
                                            "--", "/bin/sh", "-c", cmd),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=900, preexec_fn=self._join_cgroup())
            if ("Could not get lock /var/cache/apt/archives/lock" not in p.stderr
                    or time.monotonic() > deadline):
                break
            time.sleep(5)
        assert p.returncode == 0, f"apt download failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

    def boot(self, timeout: float = 180) -> None:
        log = open(self.workdir / "console.log", "wb")
        self.proc = subprocess.Popen(
            self._nspawn(f"--machine={self.name}", "--boot", "--console=read-only",
                         "--private-network", "--capability=all",
                         # nspawn's seccomp filter refuses bpf(2) unless asked.
                         "--system-call-filter=bpf",
                         "--tmpfs=/sys/fs/bpf:mode=0700"),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=self._join_cgroup())
        log.close()
        deadline = time.monotonic() + timeout
        while not self.leader:
            assert self.proc.poll() is None, f"nspawn exited:\n{self.console()}"
            assert time.monotonic() < deadline, f"no container init:\n{self.console()}"
            for child in _children(self.proc.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        self.leader = child
            time.sleep(0.1)
        state = ""
        while state not in ("running", "degraded"):
            assert time.monotonic() < deadline, f"boot did not finish ({state}):\n{self.console()}"
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=max(1, deadline - time.monotonic())).stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.5)

    def console(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "console.log").read_text(errors="replace")[-4000:]
        return ""

    def close(self) -> None:
        # nspawn turns a first SIGTERM into an orderly shutdown of the
        # container and a second into immediate termination.
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if not self.proc or self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait)
        self.leader = 0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _nspawn_dirs() -> set[str]:
    if not NSPAWN_RUN.exists():
        return set()
    return {str(p) for p in [NSPAWN_RUN, *NSPAWN_RUN.rglob("*")] if p.is_dir()}


@contextlib.contextmanager
def machine(deb: Path, files: dict[str, Path], packages: tuple[str, ...] = ()):
    """A booted container with ``deb`` and ``files`` in GUEST_DIR and every
    .deb installing it (and ``packages``) needs in its apt archive; removed
    afterwards."""
    base = base_rootfs()
    archives = CACHE / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    name = f"aus-svc-{secrets.token_hex(3)}"
    workdir = Path(f"/var/tmp/{name}")
    m = Machine(name, workdir, cgroup2_root() / name, archives,
                nspawn_dirs_before=_nspawn_dirs())
    workdir.mkdir(mode=0o700)
    m.cgroup.mkdir()
    try:
        m.prepare(base, deb, files, packages)
        m.boot()
        yield m
    finally:
        m.close()
        for hierarchy in _cgroup_hierarchies():
            _remove_cgroup_tree(hierarchy / name)
        for d in sorted(_nspawn_dirs() - m.nspawn_dirs_before, key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        if workdir.exists():
            _remove_tree(workdir)
