"""The lab of the kernel and identity tests: a tree of privileged
fixtures, each with a unique name and its cleanup in ``finally`` so a
failed test leaves nothing behind.

    Peer       a network namespace with a veth pair: the destination host
               (made over netlink, see netns.py)
    Cgroup     a child of the cgroup2 root; only test processes join it
    Users      local users and groups made with useradd/groupadd
    Ausd       the real daemon on the test cgroup, with its own pins
    Session    a login session: a process holding a login UID, announced
               with `ausctl session open` as the PAM hook does

Traffic goes only to the peer's addresses inside its own namespace. The
peer runs lab_peer.py (TCP and UDP echo); ``act`` runs lab_client.py, one
network action as a user's process, and returns what that process saw.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aus.agent import mapview, pins

from . import cgroups, netns, polling
from .names import unique

HERE = Path(__file__).resolve().parent
PEER = HERE / "lab_peer.py"       # the destination host's echo server
CLIENT = HERE / "lab_client.py"   # one network action as a user's process
PYTHON = sys.executable

wait_until = polling.wait_until   # the lab's users wait on state with it too


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


# ---- the destination host ---------------------------------------------------

@dataclass
class Peer:
    ns: str
    v4: str
    v6: str
    host_v4: str
    host_v6: str
    proc: subprocess.Popen | None = None


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


@contextlib.contextmanager
def peer(ports: list[int]):
    """A namespace reachable over a veth pair, serving TCP and UDP echo.
    Taken down in reverse, also when a step fails: the echo process killed
    by PID, the veth pair deleted, the namespace removed."""
    host_if, peer_if = unique("ausv"), unique("ausp")
    a, b = secrets.randbelow(200) + 20, secrets.randbelow(60) * 4
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(netns.namespace("aust"))
        # 198.18.0.0/15 is reserved for network tests (RFC 2544) and
        # 2001:db8::/32 for documentation: neither routes anywhere else.
        p = Peer(ns, f"198.18.{a}.{b + 2}", f"2001:db8:{a:x}:{b:x}::2",
                 f"198.18.{a}.{b + 1}", f"2001:db8:{a:x}:{b:x}::1")
        stack.enter_context(netns.veth(host_if, peer_if, ns))
        netns.up(host_if, [f"{p.host_v4}/30", f"{p.host_v6}/64"])
        netns.up(peer_if, [f"{p.v4}/30", f"{p.v6}/64"], ns=ns)
        netns.up("lo", ns=ns)
        p.proc = subprocess.Popen([PYTHON, str(PEER), ",".join(map(str, ports))],
                                  stdout=subprocess.PIPE, text=True,
                                  preexec_fn=functools.partial(netns.enter, ns))
        stack.callback(_stop, p.proc)
        assert p.proc.stdout.readline().strip() == "ready"
        yield p


# ---- cgroup ---------------------------------------------------------------

def cgroup():
    """A child of the cgroup2 root that only test processes join; removed
    afterwards, its leftover processes (ours) killed by PID."""
    return cgroups.cgroup("aus-test-")


# ---- users ----------------------------------------------------------------

@dataclass
class User:
    name: str
    uid: int
    gid: int
    groups: list[str]


@contextlib.contextmanager
def users(spec: dict[str, list[str]]):
    """Local users ({short name: [group short names]}) with unique names.
    Yields ({short: User}, {short group: real group name})."""
    tag = secrets.token_hex(2)
    group_names = {g: f"aus{tag}{g}" for gs in spec.values() for g in gs}
    made_users, made_groups = [], []
    try:
        for real in group_names.values():
            run("groupadd", real)
            made_groups.append(real)
        out = {}
        for short, gs in spec.items():
            name = f"aus{tag}{short}"
            cmd = ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin"]
            if gs:
                cmd += ["-G", ",".join(group_names[g] for g in gs)]
            run(*cmd, name)
            made_users.append(name)
            ids = run("id", "-u", name).stdout.strip(), run("id", "-g", name).stdout.strip()
            out[short] = User(name, int(ids[0]), int(ids[1]), [group_names[g] for g in gs])
        yield out, group_names
    finally:
        for name in made_users:
            run("userdel", name, check=False)
        for g in made_groups:
            run("groupdel", g, check=False)


# ---- processes with a login UID ------------------------------------------

def _become(cg: Path | None, loginuid: int | None, uid: int | None, gid: int | None):
    def pre():
        if loginuid is not None:
            with open("/proc/self/loginuid", "w") as f:
                f.write(str(loginuid))
        if cg is not None:
            with open(cg / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        if uid is not None:
            os.setgroups([])
            os.setgid(gid if gid is not None else uid)
            os.setuid(uid)
    return pre


def spawn(args: list[str], *, cg: Path | None = None, loginuid: int | None = None,
          uid: int | None = None, gid: int | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(args, preexec_fn=_become(cg, loginuid, uid, gid), **kw)


def act(cg: Path, action: str, *args, loginuid: int | None, uid: int | None = None,
        gid: int | None = None) -> dict:
    """Run one client action as a real process in the cgroup; its result."""
    p = spawn([PYTHON, str(CLIENT), action, *map(str, args)], cg=cg,
              loginuid=loginuid, uid=uid, gid=gid, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, f"client failed: {err}"
    return json.loads(out)


# ---- the daemon -------------------------------------------------------------

@dataclass
class Ausd:
    workdir: Path
    cgroup: Path
    pin_dir: Path
    config_path: Path
    policy_path: Path
    proc: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)
    # how to run ausd and ausctl: the source tree's, or an installed one
    ausd_cmd: tuple[str, ...] = (PYTHON, "-m", "aus.agent.ausd")
    ausctl_cmd: tuple[str, ...] = (PYTHON, "-m", "aus.cli.ausctl")

    @property
    def socket(self) -> Path:
        return self.workdir / "ausd.sock"

    def write_policy(self, policy: dict | str) -> None:
        text = policy if isinstance(policy, str) else yaml.safe_dump(policy, sort_keys=False)
        tmp = self.policy_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.policy_path)

    def start(self, timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        """Start ausd and wait for its sd_notify READY; ``env`` adds to
        the environment."""
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        npath = self.workdir / f"notify-{secrets.token_hex(2)}"
        notify.bind(str(npath))
        notify.settimeout(0.5)
        logf = open(self.workdir / "ausd.log", "ab")
        env = dict(os.environ, **(env or {}), NOTIFY_SOCKET=str(npath))
        self.proc = subprocess.Popen([*self.ausd_cmd, "--config", str(self.config_path)],
                                     stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if "READY=1" in notify.recv(4096).decode().split("\n"):
                        break
                except socket.timeout:
                    pass
                if self.proc.poll() is not None:
                    raise AssertionError(f"ausd exited with {self.proc.returncode} before "
                                         f"READY:\n{self.read_log()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"ausd sent no READY in {timeout}s:\n{self.read_log()}")
        finally:
            notify.close()
            npath.unlink()

    def read_log(self) -> str:
        return (self.workdir / "ausd.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = run(*self.ausctl_cmd, "--config", str(self.config_path), *args, check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"ausctl {' '.join(args)} -> {p.returncode}: {p.stderr}")
        return p

    def ctl_json(self, *args: str) -> dict:
        return json.loads(self.ctl(*args, "--json").stdout)

    def check(self, loginuid: int, to: str, proto: str, port: int = 0) -> dict:
        p = self.ctl("check", "--login-uid", str(loginuid), "--to", to, "--proto", proto,
                     "--port", str(port), "--json", check=False)
        assert p.returncode in (0, 3), p.stderr
        res = json.loads(p.stdout)
        assert (p.returncode == 0) == res["allowed"]
        return res

    def counters(self) -> dict:
        with pins.pinned_maps(self.pin_dir) as maps:
            return {"users": mapview.user_counters(maps),
                    "rules": mapview.rule_counters(maps, range(0, 64))}


@contextlib.contextmanager
def ausd(cg: Path, policy: dict | str, *, policy_url: str | None = None,
         credentials: str | None = None, **config):
    """A configured (not yet started) ausd on ``cg``; removed afterwards:
    process stopped by PID, programs detached, pins deleted. With
    ``policy_url``, the policy comes from that server, with ``credentials``
    ("key:secret") in a private file; the bundle cache is in the workdir."""
    workdir = Path(tempfile.mkdtemp(prefix="aus-test-"))
    workdir.chmod(0o755)  # unprivileged test users read the config too
    pin_dir = Path("/sys/fs/bpf") / unique("aus-test-")
    d = Ausd(workdir, cg, pin_dir, workdir / "ausd.yaml", workdir / "policy.yaml")
    d.write_policy(policy)
    cfg = {"policy": policy_url or str(d.policy_path), "cgroup": str(cg),
           "pin_dir": str(pin_dir), "socket": str(d.socket), "scan_interval": 0.2,
           "log_level": "debug", "policy_cache": str(workdir / "bundle.json"),
           "flow_spool_dir": str(workdir / "flows"), **config}
    if credentials is not None:
        path = workdir / "credentials"
        path.touch(mode=0o600)
        path.write_text(credentials + "\n")
        cfg["policy_credentials"] = str(path)
    d.config_path.write_text(yaml.safe_dump(cfg))
    try:
        yield d
    finally:
        d.stop(signal.SIGKILL)
        if pin_dir.exists():
            pins.uninstall(pin_dir)
        for p in sorted(workdir.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        workdir.rmdir()


@contextlib.contextmanager
def session(d: Ausd, loginuid: int, uid: int | None = None, gid: int | None = None):
    """A login session: a process holding ``loginuid`` (outside the test
    cgroup, like a login shell elsewhere), announced with
    `ausctl session open` from a process carrying the same login UID."""
    holder = spawn(["sleep", "600"], loginuid=loginuid, uid=uid, gid=gid)
    try:
        p = spawn([PYTHON, "-m", "aus.cli.ausctl", "--config", str(d.config_path),
                   "session", "open", "--json"], loginuid=loginuid,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, f"session open failed: {err}"
        yield json.loads(out)
    finally:
        holder.kill()
        holder.wait()
