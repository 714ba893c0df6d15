"""Socket workloads whose identity questions the kernel programs must
answer: who created a socket, versus who uses it. Result as JSON on stdout.

usage: lab_sockets.py serve ADDR PORT        listen, accept one connection, echo a line
       lab_sockets.py give FD                create a TCP socket, send it over Unix socket FD
       lab_sockets.py take FD ADDR PORT      receive a socket on Unix socket FD, connect, echo
       lab_sockets.py relogin ADDR PORT UID  create a socket, set the login UID, connect
       lab_sockets.py fastopen ADDR PORT     TCP fast open: sendto(MSG_FASTOPEN), echo
"""

import errno
import json
import socket
import sys


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def report(ok: bool, err: OSError | None = None, **extra) -> None:
    out = {"ok": ok, "errno": errno.errorcode.get(err.errno) if err and err.errno else None}
    if err and not err.errno:
        out["errno"] = type(err).__name__
    out.update(extra)
    print(json.dumps(out), flush=True)


def echo(s: socket.socket, addr: str, port: int) -> None:
    try:
        s.connect((addr, port))
        s.sendall(b"hello\n")
        report(s.recv(100) == b"hello\n")
    except OSError as e:
        report(False, e)


def serve(addr: str, port: int) -> None:
    ls = socket.socket(family(addr), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(1)
    ls.settimeout(10)
    print("listening", flush=True)
    try:
        conn, _ = ls.accept()
        conn.settimeout(5)
        line = conn.recv(100)
        conn.sendall(line)
        report(bool(line))
    except OSError as e:
        report(False, e)


def give(fd: int) -> None:
    chan = socket.socket(fileno=fd)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    socket.send_fds(chan, [b"socket"], [s.fileno()])
    report(True)


def take(fd: int, addr: str, port: int) -> None:
    chan = socket.socket(fileno=fd)
    _msg, fds, _flags, _addr = socket.recv_fds(chan, 100, 1)
    s = socket.socket(fileno=fds[0])
    s.settimeout(3)
    echo(s, addr, port)


def relogin(addr: str, port: int, loginuid: int) -> None:
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(3)
    with open("/proc/self/loginuid", "w") as f:
        f.write(str(loginuid))
    echo(s, addr, port)


def fastopen(addr: str, port: int) -> None:
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    try:
        # blocking: a socket with a timeout is non-blocking underneath,
        # and its sendto() would return EINPROGRESS before the handshake
        s.sendto(b"hello\n", socket.MSG_FASTOPEN, (addr, port))
        s.settimeout(3)
        report(s.recv(100) == b"hello\n")
    except OSError as e:
        report(False, e)


def main() -> None:
    action, args = sys.argv[1], sys.argv[2:]
    if action == "give":
        give(int(args[0]))
    elif action == "serve":
        serve(args[0], int(args[1]))
    elif action == "take":
        take(int(args[0]), args[1], int(args[2]))
    elif action == "relogin":
        relogin(args[0], int(args[1]), int(args[2]))
    elif action == "fastopen":
        fastopen(args[0], int(args[1]))
    else:
        sys.exit(f"lab_sockets.py: unknown action {action!r}")


if __name__ == "__main__":
    main()
