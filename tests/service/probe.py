"""Tries, from inside a service, what each hardening directive of
ausd.service forbids, and prints one JSON object: for every attempt "ok"
or the errno name (or the signal that killed it). Run by the unit's
ExecStartPost= (so with ausd's sandbox) and by a plain transient unit (the
control). Only the standard library: it runs on the container's python3.

    probe.py MARKER_NAME
"""

import ctypes
import errno
import json
import mmap
import os
import resource
import signal
import socket
import sys

libc = ctypes.CDLL(None, use_errno=True)
PR_GET_NO_NEW_PRIVS = 39
PER_LINUX32 = 0x0008


def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def checked(ret):
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def open_socket(family, kind, proto=0):
    socket.socket(family, kind, proto).close()


def realtime():
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def personality():
    old = checked(libc.personality(0xFFFFFFFF))
    checked(libc.personality(PER_LINUX32))
    checked(libc.personality(old))


def setuid_bit(path):
    with open(path, "w"):
        pass
    try:
        os.chmod(path, 0o4755)
    finally:
        os.unlink(path)


def read_clock():
    # adjtimex(2) with modes=0 only reads the clock state: no capability
    # is needed, but ProtectClock= forbids the call itself.
    buf = ctypes.create_string_buffer(256)
    checked(libc.adjtimex(buf))


def sethostname():
    name = os.uname().nodename.encode()
    checked(libc.sethostname(name, len(name)))


def foreign_arch_syscall():
    """getpid through the i386 entry (int 0x80) in a child; SystemCallArchitectures=native
    kills it with SIGSYS."""
    pid = os.fork()
    if pid == 0:
        code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
        m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        m.write(code)
        fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
        os._exit(0 if fn() == os.getpid() else 1)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return "ok" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"


def status_fields():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapBnd", "CapEff", "NoNewPrivs", "Seccomp"):
                out[key] = value.strip()
    return out


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main():
    marker = sys.argv[1]
    result = {
        "pid": os.getpid(),
        "status": status_fields(),
        "no_new_privs": libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
        "af_unix": attempt(lambda: open_socket(socket.AF_UNIX, socket.SOCK_DGRAM)),
        "af_inet": attempt(lambda: open_socket(socket.AF_INET, socket.SOCK_DGRAM)),
        "af_inet6": attempt(lambda: open_socket(socket.AF_INET6, socket.SOCK_DGRAM)),
        "af_netlink": attempt(lambda: open_socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)),
        "af_packet": attempt(lambda: open_socket(socket.AF_PACKET, socket.SOCK_DGRAM)),
        "realtime": attempt(realtime),
        "personality": attempt(personality),
        "setuid_bit": attempt(lambda: setuid_bit(f"/run/aus-probe-{os.getpid()}")),
        "read_clock": attempt(read_clock),
        "sethostname": attempt(sethostname),
        "foreign_arch": foreign_arch_syscall(),
        "uts_ns_private": os.readlink("/proc/self/ns/uts") != os.readlink("/proc/1/ns/uts"),
        "tmp_marker_visible": os.path.exists(f"/tmp/{marker}"),
        "root_marker_visible": os.path.exists(f"/root/{marker}"),
        "home_marker_visible": os.path.exists(f"/home/{marker}"),
        "kmsg": attempt(lambda: os.close(os.open("/proc/kmsg", os.O_RDONLY | os.O_NONBLOCK))),
        "syslog": attempt(lambda: checked(libc.klogctl(10, None, 0))),  # SYSLOG_ACTION_SIZE_BUFFER
        "umask": oct(current_umask()),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
