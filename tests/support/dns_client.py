"""A user's process that resolves names and connects to what they resolve
to, as an application does: the DNS query goes to the resolver it names
(the kernel may redirect it to ausd's forwarder), the connect() follows
the answer at once. Result as JSON on stdout.

usage: dns_client.py resolve-connect RESOLVER TEMPLATE COUNT PORT [tcp] [aaaa]
    for i in 0..COUNT-1: ask TEMPLATE.format(i=i) (A, or AAAA) over UDP (or
    TCP) of RESOLVER port 53, then connect() over TCP to every address of
    the answer on PORT, at once, and close
       dns_client.py hold RESOLVER NAME PORT
    resolve NAME, connect to its first address, print a line, then on each
    line read from stdin send it and print what comes back ("-" when the
    exchange failed), until stdin closes

Every connection is judged by the kernel before a packet leaves: EPERM is
a denial; anything else is the network's answer.
"""

from __future__ import annotations

import errno
import json
import socket
import sys

import dns.message
import dns.query
import dns.rdatatype


def resolve(resolver: str, name: str, qtype: str, tcp: bool) -> list[str]:
    q = dns.message.make_query(name, qtype)
    ask = dns.query.tcp if tcp else dns.query.udp
    answer = ask(q, resolver, timeout=8)
    want = dns.rdatatype.from_text(qtype)
    return [r.address for rrset in answer.answer if rrset.rdtype == want for r in rrset]


def connect(addr: str, port: int) -> str | None:
    """None when connected; else the errno name."""
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((addr, port))
        return None
    except OSError as exc:
        return errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else "timeout"
    finally:
        s.close()


def resolve_connect(resolver: str, template: str, count: int, port: int, tcp: bool,
                    aaaa: bool) -> dict:
    out = {"tries": count, "resolved": 0, "connected": 0, "addresses": 0, "failures": []}
    for i in range(count):
        name = template.format(i=i)
        try:
            addrs = resolve(resolver, name, "AAAA" if aaaa else "A", tcp)
        except Exception as exc:  # noqa: BLE001 - reported
            out["failures"].append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if addrs:
            out["resolved"] += 1
        ok = True
        for addr in addrs:
            out["addresses"] += 1
            err = connect(addr, port)
            if err is not None:
                ok = False
                if len(out["failures"]) < 20:
                    out["failures"].append({"name": name, "addr": addr, "errno": err})
        if addrs and ok:
            out["connected"] += 1
    return out


def hold(resolver: str, name: str, port: int) -> None:
    addr = resolve(resolver, name, "A", False)[0]
    s = socket.create_connection((addr, port), timeout=5)
    print(json.dumps({"connected": addr}), flush=True)
    for line in sys.stdin:
        try:
            s.sendall(line.encode())
            print(json.dumps({"echo": s.recv(65535).decode()}), flush=True)
        except OSError as exc:
            print(json.dumps({"echo": None, "errno": errno.errorcode.get(exc.errno)}), flush=True)
    s.close()


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "resolve-connect":
        flags = set(args[4:])
        print(json.dumps(resolve_connect(args[0], args[1], int(args[2]), int(args[3]),
                                         "tcp" in flags, "aaaa" in flags)), flush=True)
    elif cmd == "hold":
        hold(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
