"""A test workload for DNS: what a resolver library does with its sockets,
as one process of a user. Result as JSON on stdout.

usage: lab_dns.py udp ADDR PORT TEXT [SPORT]
                                            sendto() (from source port SPORT if given),
                                            recvfrom(): the answer and its source
       lab_dns.py udp-connected ADDR PORT TEXT
                                            connect(), getpeername(), send(), recvfrom()
       lab_dns.py tcp ADDR PORT TEXT        connect(), getpeername(), a 2-byte length
                                            framed query and answer (DNS over TCP)
       lab_dns.py retry ADDR PORT           connect() a TCP socket; after a line on
                                            stdin, connect() the same socket again
Every result carries "ok", "errno", and what was seen ("answer", "source",
"peer"); ADDR with a colon is IPv6 (a v4-mapped one too).
"""

import socket
import struct
import sys

# a sibling script (this one runs with tests/support first on sys.path)
from lab_sockets import family, report


def where(sockaddr) -> list:
    return [sockaddr[0], sockaddr[1]]


def udp(addr: str, port: int, text: str, connected: bool, sport: int = 0) -> None:
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.settimeout(3)
    if sport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if s.family == socket.AF_INET6 else "0.0.0.0", sport))
    seen = {}
    try:
        if connected:
            s.connect((addr, port))
            seen["peer"] = where(s.getpeername())
            s.send(text.encode())
        else:
            s.sendto(text.encode(), (addr, port))
        data, source = s.recvfrom(512)
        report(True, answer=data.decode(errors="replace"), source=where(source), **seen)
    except OSError as e:
        report(False, e, **seen)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return buf


def tcp(addr: str, port: int, text: str) -> None:
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(3)
    seen = {}
    try:
        s.connect((addr, port))
        seen["peer"] = where(s.getpeername())
        s.sendall(struct.pack("!H", len(text)) + text.encode())
        (n,) = struct.unpack("!H", _recv_exact(s, 2))
        report(True, answer=_recv_exact(s, n).decode(errors="replace"), **seen)
    except OSError as e:
        report(False, e, **seen)
    finally:
        s.close()


def retry(addr: str, port: int) -> None:
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(3)
    for _ in range(2):
        try:
            s.connect((addr, port))
            s.sendall(b"hello\n")
            report(s.recv(100) == b"hello\n")
            return
        except OSError as e:
            report(False, e)
        sys.stdin.readline()


def main() -> None:
    action, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if action == "udp":
        udp(addr, port, sys.argv[4], connected=False,
            sport=int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    elif action == "udp-connected":
        udp(addr, port, sys.argv[4], connected=True)
    elif action == "tcp":
        tcp(addr, port, sys.argv[4])
    elif action == "retry":
        retry(addr, port)
    else:
        sys.exit(f"lab_dns.py: unknown action {action!r}")


if __name__ == "__main__":
    main()
