"""A test workload: one network action, result as JSON on stdout.

The test starts it inside its cgroup with the login UID and uid it wants,
so what this process sees is what a user's process sees.

usage: lab_client.py tcp ADDR PORT | udp ADDR PORT | ping ADDR | hold ADDR PORT
                 | probe ADDR ALLOWED_PORT DENIED_PORT | flood ADDR PORT COUNT
hold: connect, then for each line on stdin send it and report the echo.
probe: connect to both ports over and over until stdin closes, then report
how often each outcome was seen.
"""

import errno
import json
import socket
import subprocess
import sys


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def result(ok: bool, err: OSError | None = None, **extra) -> dict:
    out = {"ok": ok, "errno": errno.errorcode.get(err.errno) if err and err.errno else None}
    if err and not err.errno:
        out["errno"] = type(err).__name__
    out.update(extra)
    return out


def tcp(addr: str, port: int) -> dict:
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((addr, port))
        s.sendall(b"hello\n")
        return result(s.recv(100) == b"hello\n")
    except OSError as e:
        return result(False, e)
    finally:
        s.close()


def udp(addr: str, port: int) -> dict:
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(b"datagram", (addr, port))
        data, _ = s.recvfrom(100)
        return result(data == b"datagram")
    except OSError as e:
        return result(False, e)
    finally:
        s.close()


def ping(addr: str) -> dict:
    cmd = ["ping", "-n", "-c", "1", "-W", "2", addr]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return {"ok": p.returncode == 0, "errno": None if p.returncode == 0 else p.stderr.strip()[-200:]}


def hold(addr: str, port: int) -> None:
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((addr, port))
        print(json.dumps(result(True)), flush=True)
    except OSError as e:
        print(json.dumps(result(False, e)), flush=True)
        return
    for line in sys.stdin:
        try:
            s.sendall(line.encode())
            print(json.dumps(result(s.recv(100) == line.encode())), flush=True)
        except OSError as e:
            print(json.dumps(result(False, e)), flush=True)


def probe(addr: str, allowed: int, denied: int) -> None:
    import threading
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    counts = {"allowed_ok": 0, "allowed_fail": 0, "denied_ok": 0, "denied_fail": 0, "errors": []}
    print("started", flush=True)
    while not stop.is_set():
        for port, name in ((allowed, "allowed"), (denied, "denied")):
            r = tcp(addr, port)
            counts[f"{name}_{'ok' if r['ok'] else 'fail'}"] += 1
            if r["ok"] != (name == "allowed") and len(counts["errors"]) < 10:
                counts["errors"].append([port, r])
    print(json.dumps(counts), flush=True)


def flood(addr: str, port: int, count: int) -> dict:
    """Unconnected UDP datagrams to one port, as fast as possible."""
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    refused = 0
    for _ in range(count):
        try:
            s.sendto(b"x", (addr, port))
        except PermissionError:
            refused += 1
    s.close()
    return {"ok": True, "errno": None, "refused": refused}


def main() -> None:
    action, addr = sys.argv[1], sys.argv[2]
    if action == "probe":
        probe(addr, int(sys.argv[3]), int(sys.argv[4]))
        return
    if action == "hold":
        hold(addr, int(sys.argv[3]))
        return
    out = {"tcp": lambda: tcp(addr, int(sys.argv[3])),
           "udp": lambda: udp(addr, int(sys.argv[3])),
           "ping": lambda: ping(addr),
           "flood": lambda: flood(addr, int(sys.argv[3]), int(sys.argv[4]))}[action]()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
