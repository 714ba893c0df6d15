"""A control-socket client run as a test user's process: what a local user
(or a careless script) can send to ausd, and what came back, as JSON on
stdout.

usage: lab_control.py SOCKET send            each request (raw bytes, one hex
                                              line each on stdin) on its own
                                              connection; the replies
       lab_control.py SOCKET hold N           N connections that send half a
                                              request and wait; the replies
                                              (busy now, or the deadline's)
       lab_control.py SOCKET follow N         N followers; prints the first
                                              replies, then "held", then holds
                                              them until stdin closes
       lab_control.py SOCKET flood SECONDS    the requests of stdin, over and
                                              over on new connections, for
                                              SECONDS; the replies by kind
       lab_control.py SOCKET login            session_open (root only): the
                                              seconds until the reply
"""

import json
import socket
import sys
import time


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def reply_of(s: socket.socket) -> dict | None:
    buf = b""
    try:
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as exc:
        return {"transport": type(exc).__name__}
    return json.loads(buf.split(b"\n", 1)[0]) if buf else None


def send(path: str, raw: list[bytes]) -> list:
    out = []
    for data in raw:
        with connect(path) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass   # refused before the end: the reply says why
            out.append(reply_of(s))
    return out


def hold(path: str, n: int) -> dict:
    conns = [connect(path) for _ in range(n)]
    t0 = time.monotonic()
    for s in conns:
        try:
            s.sendall(b'{"cmd": "sta')
        except OSError:
            pass
    replies = [reply_of(s) for s in conns]
    return {"replies": replies, "seconds": round(time.monotonic() - t0, 3)}


def follow(path: str, n: int) -> None:
    conns, replies = [], []
    for _ in range(n):
        s = connect(path)
        s.sendall(b'{"cmd":"flows","follow":true,"limit":0}\n')
        replies.append(reply_of(s))
        conns.append(s)
    print(json.dumps(replies), flush=True)
    sys.stdin.read()   # held (and never read) until the test lets go


def flood(path: str, seconds: float, raw: list[bytes]) -> dict:
    seen: dict[str, int] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for r in send(path, raw):
            key = "none" if r is None else "ok" if r.get("ok") else "error"
            seen[key] = seen.get(key, 0) + 1
    return seen


def login(path: str) -> dict:
    t0 = time.monotonic()
    with connect(path) as s:
        s.sendall(b'{"cmd":"session_open"}\n')
        reply = reply_of(s)
    return {"reply": reply, "seconds": time.monotonic() - t0}


def requests() -> list[bytes]:
    return [bytes.fromhex(line) for line in sys.stdin.read().split()]


def main() -> None:
    path, action, *args = sys.argv[1:]
    if action == "send":
        print(json.dumps(send(path, requests())))
    elif action == "hold":
        print(json.dumps(hold(path, int(args[0]))))
    elif action == "follow":
        follow(path, int(args[0]))
    elif action == "flood":
        print(json.dumps(flood(path, float(args[0]), requests())))
    elif action == "login":
        print(json.dumps(login(path)))
    else:
        raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    main()
