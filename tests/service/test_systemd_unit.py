"""packaging/systemd/ausd.service under a real systemd: the package
installs in a booted Debian 12 container, its postinst starts ausd, and the
unit's promises hold (notify, watchdog, restart on failure without a gap in
enforcement, stop leaves enforcement, reload) with every hardening
directive in effect. ausd attaches to the container's cgroup namespace
root, a cgroup made for this test (see container.py)."""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import threading
import time

import yaml

from aus.agent.config import cgroup2_root
from aus.core.contract import PROGRAMS as HOOKS
from tests.support.polling import wait_until

from . import container
from .ausd_unit import cursor, ensure_running, log_since, state, wait_log
from .conftest import POLICY, REPO

UNIT_FILE = REPO / "packaging/systemd/ausd.service"
DROPINS = "/etc/systemd/system/ausd.service.d"
# bpftool shows a name the kernel cut to 15 characters whole, from BTF
PROGRAMS = {h.func for h in HOOKS}
LINKS = sorted(h.link for h in HOOKS)
SESSION_UID = 4242

# Everything in [Service] that restricts the daemon, each checked below.
HARDENING = {"CapabilityBoundingSet", "NoNewPrivileges", "ProtectHome", "PrivateTmp",
             "ProtectClock", "ProtectHostname", "RestrictRealtime", "RestrictSUIDSGID",
             "LockPersonality", "RestrictAddressFamilies", "SystemCallArchitectures",
             "ProtectKernelLogs", "UMask", "LimitNOFILE"}
NOT_HARDENING = {"Type", "NotifyAccess", "ExecCondition", "ExecStartPre", "ExecStart", "ExecReload", "Restart",
                 "RestartSec", "WatchdogSec", "TimeoutStartSec", "KillMode", "RuntimeDirectory",
                 "RuntimeDirectoryPreserve"}
# linux/capability.h, by number.
CAPABILITIES = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap "
    "linux_immutable net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner "
    "sys_module sys_rawio sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice "
    "sys_resource sys_time sys_tty_config mknod lease audit_write audit_control setfcap "
    "mac_override mac_admin syslog wake_alarm block_suspend audit_read perfmon bpf "
    "checkpoint_restore").split()


# ---- helpers -------------------------------------------------------------------

def service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read_string(UNIT_FILE.read_text())
    return dict(parser["Service"])


def unit_capabilities() -> list[str]:
    return service_section()["CapabilityBoundingSet"].split()


def cap_mask(names) -> int:
    return sum(1 << CAPABILITIES.index(n.lower().removeprefix("cap_")) for n in names)


@contextlib.contextmanager
def dropin(m, name: str, text: str):
    path = f"{DROPINS}/{name}.conf"
    m.write(path, "[Service]\n" + text)
    m.systemctl("daemon-reload")
    try:
        yield
    finally:
        m.run("rm", "-f", path)
        m.systemctl("daemon-reload")


def attached(box) -> set[str]:
    """The names of the programs attached to the container's cgroup, as the
    host sees them."""
    out = container.run("bpftool", "-j", "cgroup", "show", str(box.m.payload_cgroup)).stdout
    return {p["name"] for p in json.loads(out.strip() or "[]")}


def active_users(m) -> int:
    return m.ausctl_json("status")["users"]["active"]


def proc_status(m, pid: int | str) -> dict[str, str]:
    out = m.run("cat", f"/proc/{pid}/status").stdout
    return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def mounts(m, pid: int | str) -> dict[str, str]:
    """{mount point: the directory of its file system mounted there}."""
    lines = m.run("cat", f"/proc/{pid}/mountinfo").stdout.splitlines()
    return {f[4]: f[3] for f in (line.split() for line in lines)}


# ---- installation and start ----------------------------------------------------

def test_package_installs_with_its_dependencies_and_postinst_starts_ausd(box):
    m = box.m
    out = box.install.stdout
    assert box.install.returncode == 0, out[-3000:] + box.install.stderr[-3000:]
    # apt resolved and installed the dependencies in this container.
    for pkg in ("python3-bpfcc", "linux-headers-amd64", "python3-yaml", "procps",
                "aus"):
        assert re.search(rf"^Setting up {re.escape(pkg)}(:amd64)? \(", out, re.M), pkg
    build = m.run("readlink", "-f", f"/lib/modules/{os.uname().release}/build").stdout.strip()
    assert re.fullmatch(r"/usr/src/linux-headers-.*-amd64", build), build
    assert m.run("cat", "/lib/systemd/system/ausd.service").stdout == UNIT_FILE.read_text()
    # postinst enabled and started the unit (READY=1 reached systemd).
    a = box.after_install
    assert a["UnitFileState"] == "enabled"
    assert (a["ActiveState"], a["SubState"], a["NRestarts"]) == ("active", "running", "0"), a
    assert int(a["MainPID"]) > 0


def test_systemctl_reports_the_notify_service(box):
    m = box.m
    ensure_running(box)
    s = m.show("ausd", "Type", "NotifyAccess", "WatchdogUSec", "Restart", "RestartUSec",
               "KillMode", "MainPID", "StatusText", "RuntimeDirectory")
    assert (s["Type"], s["NotifyAccess"], s["WatchdogUSec"]) == ("notify", "main", "30s")
    assert (s["Restart"], s["RestartUSec"], s["KillMode"]) == ("on-failure", "1s", "mixed")
    assert s["StatusText"].startswith("enforcing policy version "), s
    pid = int(s["MainPID"])
    # The main PID, whose notifications count, is ausd itself, not a shell.
    assert "aus.agent.ausd" in m.run("cat", f"/proc/{pid}/cmdline").stdout
    status = m.ausctl_json("status")
    assert status["daemon"]["running"] and status["daemon"]["pid"] == pid
    assert (status["pin_dir"], status["cgroup"]) == (box.pin_dir, box.cgroup)
    assert [p["attached"] for p in status["programs"]] == [True] * len(HOOKS)
    text = m.systemctl("status", "ausd", "--no-pager", "--lines=0").stdout
    assert "Active: active (running)" in text, text
    assert f"Main PID: {pid} (python3)" in text, text
    assert 'Status: "enforcing policy version' in text, text


def test_programs_attach_to_the_containers_cgroup_and_nowhere_else(box):
    m = box.m
    ensure_running(box)
    # The container's cgroup2 root is the payload cgroup nspawn made inside
    # ours, not the host's root.
    inode = int(m.run("stat", "-c", "%i", box.cgroup).stdout)
    assert inode == os.stat(m.payload_cgroup).st_ino
    assert inode != os.stat(cgroup2_root()).st_ino
    ids = {p["prog_id"] for p in m.ausctl_json("status")["programs"]}
    tree = json.loads(container.run("bpftool", "-j", "cgroup", "tree", str(cgroup2_root())).stdout)
    where = {e["cgroup"] for e in tree for p in e["programs"] if p["id"] in ids}
    assert where == {str(m.payload_cgroup)}
    assert attached(box) == PROGRAMS


def test_pins_live_in_the_systems_bpffs_not_the_services(box):
    m = box.m
    pid = ensure_running(box)["MainPID"]
    # ausd has a mount namespace of its own (PrivateTmp=, ProtectHome=) ...
    assert (m.run("readlink", f"/proc/{pid}/ns/mnt").stdout
            != m.run("readlink", "/proc/1/ns/mnt").stdout)
    # ... yet its pins are in the container's own bpffs, which the test did
    # not mount: ExecStartPre= did, in the system's namespace.
    assert m.run("stat", "-f", "-c", "%T", "/sys/fs/bpf").stdout.strip() == "bpf_fs"
    assert sorted(m.run("ls", f"{box.pin_dir}/links").stdout.split()) == LINKS
    first = m.journal(box.after_install["InvocationID"])
    assert "ready" in first and "mounting bpffs" not in first, first


# ---- watchdog, restart, reload ---------------------------------------------------------

def test_watchdog_is_pinged_and_a_silent_daemon_is_restarted(box):
    m = box.m
    ensure_running(box)
    with dropin(m, "watchdog", "WatchdogSec=3s\nTimeoutAbortSec=1s\n"):
        m.systemctl("restart", "ausd")
        s0 = state(m, "WatchdogUSec")
        assert s0["WatchdogUSec"] == "3s"
        pid, restarts = s0["MainPID"], int(s0["NRestarts"])
        stamps = set()
        end = time.monotonic() + 8          # well past two watchdog periods
        while time.monotonic() < end:
            s = state(m, "WatchdogTimestampMonotonic")
            assert (s["ActiveState"], s["MainPID"]) == ("active", pid), s
            stamps.add(int(s["WatchdogTimestampMonotonic"]))
            time.sleep(0.5)
        assert int(state(m)["NRestarts"]) == restarts
        assert len(stamps) >= 5, stamps     # a ping about every scan (1 s)
        # The watchdog is armed: a daemon that stops pinging is killed and
        # restarted (Restart=on-failure covers a watchdog timeout).
        since = cursor(m)
        m.run("kill", "-STOP", pid)
        s = wait_until(lambda: (s := state(m))["MainPID"] not in ("0", pid)
                       and s["ActiveState"] == "active" and s, 30, interval=0.2, what="a restarted ausd")
        assert int(s["NRestarts"]) == restarts + 1
        wait_log(m, since, "Watchdog timeout")
    m.systemctl("restart", "ausd")
    assert state(m, "WatchdogUSec")["WatchdogUSec"] == "30s"


def test_kill_9_restarts_ausd_and_enforcement_never_stops(box):
    m = box.m
    s0 = ensure_running(box)
    pid, restarts = s0["MainPID"], int(s0["NRestarts"])
    samples: list[set[str]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(attached(box))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    since = cursor(m)
    sampler.start()
    try:
        time.sleep(0.2)
        m.run("kill", "-9", pid)
        s = wait_until(lambda: (s := state(m))["MainPID"] not in ("0", pid)
                       and s["ActiveState"] == "active" and s, 60, interval=0.2, what="a restarted ausd")
        time.sleep(0.2)
    finally:
        stop.set()
        sampler.join()
    assert int(s["NRestarts"]) == restarts + 1
    assert len(samples) >= 20, len(samples)
    gaps = [i for i, names in enumerate(samples) if names != PROGRAMS]
    assert not gaps, f"{len(gaps)} of {len(samples)} samples without the programs: {samples[gaps[0]]}"
    log = wait_log(m, since, "replaced in place")   # the same links, new programs
    assert "status=9/KILL" in log, log
    status = m.ausctl_json("status")
    assert status["daemon"]["pid"] == int(s["MainPID"])
    assert all(p["attached"] for p in status["programs"])


def test_reload_rereads_the_policy_in_the_same_process(box):
    m = box.m
    pid = ensure_running(box)["MainPID"]
    before = m.ausctl_json("status")["policy"]
    policy = dict(POLICY, rules=[*POLICY["rules"], {
        "name": "staff-ssh", "sources": ["staff"], "destinations": ["lab"],
        "services": ["22/tcp"]}])
    since = cursor(m)
    m.write("/etc/aus/policy.yaml", yaml.safe_dump(policy, sort_keys=False))
    try:
        m.systemctl("reload", "ausd")
        after = wait_until(lambda: (p := m.ausctl_json("status")["policy"])["version"]
                           == before["version"] + 1 and p, 15, interval=0.2, what="the new policy version")
        assert after["rules"] == 2 and after["error"] is None
        assert state(m)["MainPID"] == pid
        wait_log(m, since, "policy /etc/aus/policy.yaml loaded: version")   # ausctl reload
    finally:
        m.write("/etc/aus/policy.yaml", yaml.safe_dump(POLICY, sort_keys=False))
        m.systemctl("reload", "ausd")


# ---- hardening ----------------------------------------------------------------------

def test_every_directive_of_the_unit_is_known():
    keys = set(service_section())
    assert keys - NOT_HARDENING == HARDENING, "a new directive needs a check in this file"


def test_hardening_directives_are_in_effect(box, token):
    m = box.m
    unit = service_section()
    caps = unit_capabilities()
    pid = ensure_running(box)["MainPID"]

    s = m.show("ausd", *HARDENING - {"LimitNOFILE"}, "LimitNOFILE", "LimitNOFILESoft")
    assert sorted(s["CapabilityBoundingSet"].upper().split()) == sorted(caps)
    assert set(s["RestrictAddressFamilies"].split()) == set(unit["RestrictAddressFamilies"].split())
    assert s["LimitNOFILE"] == s["LimitNOFILESoft"] == unit["LimitNOFILE"]
    for key in HARDENING - {"CapabilityBoundingSet", "RestrictAddressFamilies", "LimitNOFILE"}:
        assert s[key] == unit[key], key

    # ausd itself: the bounding set (what the container has of it), no new
    # privileges, seccomp filters, its own /tmp, /home, /root and hostname.
    st = proc_status(m, pid)
    container_caps = int(proc_status(m, 1)["CapBnd"], 16)
    want = cap_mask(caps) & container_caps
    assert int(st["CapBnd"], 16) == want and int(st["CapEff"], 16) == want, st
    assert (st["NoNewPrivs"], st["Seccomp"]) == ("1", "2"), st
    own, system = mounts(m, pid), mounts(m, 1)
    assert "/systemd-private-" in own["/tmp"] and own["/tmp"] != system.get("/tmp"), own
    assert {"/home", "/root"} <= own.keys() - system.keys(), own
    assert (m.run("readlink", f"/proc/{pid}/ns/uts").stdout
            != m.run("readlink", "/proc/1/ns/uts").stdout)

    # What each directive forbids, tried from ausd's sandbox (ExecStartPost=
    # runs in it) and, as the control, from a plain service with the same
    # capabilities. Both also get CAP_SYS_NICE, so that only
    # RestrictRealtime= can refuse SCHED_FIFO.
    marker = f"aus-probe-{token}"
    for d in ("/tmp", "/root", "/home"):
        m.run("touch", f"{d}/{marker}")
    probe = f"{container.GUEST_DIR}/probe.py"
    try:
        control = json.loads(m.run(
            "systemd-run", "--wait", "--pipe", "--quiet",
            f"--property=CapabilityBoundingSet={' '.join(caps)} CAP_SYS_NICE",
            "/usr/bin/python3", probe, marker).stdout)
        since = cursor(m)
        with dropin(m, "probe", "CapabilityBoundingSet=CAP_SYS_NICE\n"
                    f"ExecStartPost=/usr/bin/python3 {probe} {marker}\n"):
            m.systemctl("restart", "ausd")
            log = wait_log(m, since, '{"pid": ')
        sandboxed = json.loads(next(line for line in log.splitlines()
                                    if line.startswith('{"pid": ')))
    finally:
        m.run("rm", "-f", *(f"{d}/{marker}" for d in ("/tmp", "/root", "/home")))
        m.systemctl("restart", "ausd")

    def both(key):
        return control[key], sandboxed[key]

    with_nice = cap_mask([*caps, "CAP_SYS_NICE"]) & container_caps
    assert int(control["status"]["CapBnd"], 16) == with_nice
    assert int(sandboxed["status"]["CapBnd"], 16) == with_nice            # CapabilityBoundingSet
    assert both("no_new_privs") == (0, 1)                                  # NoNewPrivileges
    assert both("tmp_marker_visible") == (True, False)                     # PrivateTmp
    assert both("root_marker_visible") == (True, False)                    # ProtectHome
    assert both("home_marker_visible") == (True, False)
    assert both("read_clock") == ("ok", "EPERM")                           # ProtectClock
    assert both("sethostname") == ("ok", "EPERM")                          # ProtectHostname
    assert both("uts_ns_private") == (False, True)
    assert both("realtime") == ("ok", "EPERM")                             # RestrictRealtime
    assert both("setuid_bit") == ("ok", "EPERM")                           # RestrictSUIDSGID
    assert both("personality") == ("ok", "EPERM")                          # LockPersonality
    assert both("foreign_arch") == ("ok", "SIGSYS")                        # SystemCallArchitectures
    # RestrictAddressFamilies: the listed families open, others do not
    # exist (the control lacks CAP_NET_RAW for AF_PACKET: EPERM, not this).
    assert sandboxed["af_packet"] == "EAFNOSUPPORT" and control["af_packet"] != "EAFNOSUPPORT"
    for family in ("af_unix", "af_inet", "af_inet6", "af_netlink"):
        assert both(family) == ("ok", "ok"), family
    # ProtectKernelLogs: /proc/kmsg is out of reach and syslog(2) refused.
    print(f"kernel log: control {both('kmsg')} {both('syslog')}")
    assert sandboxed["kmsg"] != "ok" and sandboxed["syslog"] == "EPERM"
    assert control["kmsg"] == "ok" or control["syslog"] == "ok", control
    assert both("umask") == ("0o22", "0o77")                               # UMask
    # LimitNOFILE, soft and hard, within what the container itself allows.
    nofile = min(int(unit["LimitNOFILE"]), control["nofile"][1])
    assert sandboxed["nofile"] == [nofile, nofile] and control["nofile"][0] < nofile, both("nofile")
    assert proc_limits_nofile(m, ensure_running(box)["MainPID"]) == nofile


def proc_limits_nofile(m, pid) -> int:
    line = next(line for line in m.run("cat", f"/proc/{pid}/limits").stdout.splitlines()
                if line.startswith("Max open files"))
    return int(line.split()[3])


def test_a_daemon_that_cannot_start_stops_at_the_start_limit(box):
    """StartLimitIntervalSec=/StartLimitBurst= in [Unit]: a daemon failing
    at every start is retried 10 times, then left failed."""
    m = box.m
    ensure_running(box)
    s = m.show("ausd", "StartLimitIntervalUSec", "StartLimitBurst")
    assert (s["StartLimitIntervalUSec"], s["StartLimitBurst"]) == ("1min", "10"), s
    since = cursor(m)
    try:
        with dropin(m, "fail", "ExecStart=\nExecStart=/bin/false\n"):
            m.systemctl("restart", "ausd", check=False)
            wait_log(m, since, "Start request repeated too quickly", timeout=60)
            s = m.show("ausd", "ActiveState", "NRestarts")
            assert (s["ActiveState"], s["NRestarts"]) == ("failed", "10"), s
            time.sleep(3)      # and it stays down
            assert m.show("ausd", "NRestarts")["NRestarts"] == "10"
            assert attached(box) == PROGRAMS          # what is pinned keeps enforcing
    finally:
        m.systemctl("reset-failed", "ausd", check=False)
        m.systemctl("restart", "ausd")
    assert state(m)["ActiveState"] == "active"


def test_protect_kernel_modules_is_left_out_because_bcc_needs_lib_modules(box):
    """ProtectKernelModules= hides /lib/modules, where the kernel headers
    bcc compiles against are linked: ausd cannot start with it."""
    m = box.m
    ensure_running(box)
    assert "ProtectKernelModules" not in service_section()
    try:
        with dropin(m, "kmod", "ProtectKernelModules=yes\nRestart=no\n"):
            since = cursor(m)
            assert m.systemctl("restart", "ausd", check=False).returncode != 0
            assert state(m)["ActiveState"] == "failed"
            log = log_since(m, since)
            print(f"ausd with ProtectKernelModules=yes:\n{log[-1500:]}")
            assert "lib/modules" in log or "kernel headers" in log.lower() or "headers" in log, log
            assert attached(box) == PROGRAMS
    finally:
        m.systemctl("reset-failed", "ausd", check=False)
        m.systemctl("restart", "ausd")
    assert state(m)["ActiveState"] == "active"


# ---- capabilities ----------------------------------------------------------------

def test_cap_sys_admin_is_needed_to_restart_on_the_pins(box):
    """A restart of the same build takes the attached programs through their
    pins, without CAP_SYS_ADMIN. A new build compiles, and bcc reopens the
    pinned maps by ID (BPF_MAP_GET_FD_BY_ID), which only CAP_SYS_ADMIN may
    do; a first start on no pins loads and attaches with CAP_BPF,
    CAP_PERFMON and CAP_NET_ADMIN."""
    m = box.m
    ensure_running(box)
    try:
        with dropin(m, "no-sys-admin", "CapabilityBoundingSet=~CAP_SYS_ADMIN\nRestart=no\n"):
            m.systemctl("restart", "ausd")                 # the same build
            assert state(m)["ActiveState"] == "active"
            assert attached(box) == PROGRAMS
            # a new build: the build pin names another
            m.run("sh", "-c", f"rm -f {box.pin_dir}/v*/build_*")
            since = cursor(m)
            assert m.systemctl("restart", "ausd", check=False).returncode != 0
            assert state(m)["ActiveState"] == "failed"
            wait_log(m, since, "Operation not permitted")
            assert attached(box) == PROGRAMS        # a failed start leaves enforcement
            m.run("ausctl", "uninstall", "--yes")
            assert attached(box) == set()
            m.systemctl("reset-failed", "ausd")
            m.systemctl("start", "ausd")
            assert state(m)["ActiveState"] == "active"
            assert attached(box) == PROGRAMS
    finally:
        m.systemctl("reset-failed", "ausd", check=False)
        m.systemctl("restart", "ausd")
    assert state(m)["ActiveState"] == "active"


def test_cap_sys_ptrace_is_needed_to_see_sessions_under_hidepid(box, token):
    """With /proc mounted hidepid=invisible and gid= a group root is not in,
    only CAP_SYS_PTRACE lets ausd see other users' processes, and so the
    sessions that began while it was down."""
    m = box.m
    ensure_running(box)
    login = f"aus-test-login-{token}"
    m.run("systemd-run", f"--unit={login}", "--quiet", "/bin/sh", "-c",
          f"echo {SESSION_UID} > /proc/self/loginuid && exec setpriv --reuid={SESSION_UID} "
          f"--regid={SESSION_UID} --clear-groups sleep 600")
    try:
        wait_until(lambda: active_users(m) == 1, 15, interval=0.2, what="ausd to see the session")
        m.run("mount", "-o", f"remount,hidepid=invisible,gid={SESSION_UID + 1}", "/proc")
        try:
            with dropin(m, "no-sys-ptrace", "CapabilityBoundingSet=~CAP_SYS_PTRACE\n"):
                m.systemctl("restart", "ausd")   # its start scans /proc before READY
                assert active_users(m) == 0
            m.systemctl("restart", "ausd")
            assert active_users(m) == 1
        finally:
            m.run("mount", "-o", "remount,hidepid=off,gid=0", "/proc")
    finally:
        m.systemctl("stop", login, check=False)
    wait_until(lambda: active_users(m) == 0, 15, interval=0.2, what="the session to end")


# ---- stop and uninstall --------------------------------------------------------------

def test_stop_leaves_enforcement_and_uninstall_removes_it(box):
    m = box.m
    ensure_running(box)
    m.systemctl("stop", "ausd")
    s = state(m)
    assert (s["ActiveState"], s["MainPID"]) == ("inactive", "0"), s
    status = m.ausctl_json("status")
    assert status["daemon"]["running"] is False and status["installed"] is True
    assert attached(box) == PROGRAMS
    assert sorted(m.run("ls", f"{box.pin_dir}/links").stdout.split()) == LINKS
    assert m.run("test", "-d", "/run/aus", check=False).returncode == 0   # RuntimeDirectoryPreserve
    m.run("ausctl", "uninstall", "--yes")
    assert attached(box) == set()
    assert m.run("test", "-e", box.pin_dir, check=False).returncode != 0
