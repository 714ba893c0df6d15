"""A small authoritative DNS server for tests and benchmarks, UDP and TCP.

It answers from a zone given as a dict (or a JSON file)::

    {"github.com": {"A": ["192.0.2.1", "192.0.2.2"], "AAAA": ["2001:db8::1"], "ttl": 5},
     "www.example.org": {"CNAME": "edge.example.net", "ttl": 30},
     "edge.example.net": {"A": ["192.0.2.9"], "ttl": 60},
     "big.example": {"A": ["192.0.2.3"], "truncate": true},
     "slow.example": {"A": ["192.0.2.4"], "silent": true}}

with exactly the TTLs given (default 60), CNAME chains followed inside one
answer, NXDOMAIN for a name not in the zone and an empty NOERROR answer for
a name without records of the type asked. Two switches for tests:
``truncate`` answers over UDP with the TC bit and no records (TCP answers
in full), ``silent`` never answers. Names are compared case-insensitively,
a final dot ignored.

In a process of its own (a test network namespace: preexec_fn=
functools.partial(netns.enter, ns))::

    python -m tests.support.dnsserver --listen 10.0.0.2 --port 53 --zone zone.json

prints ``ready`` on stdout once both sockets are bound (with ``--port 0``
first ``port N``), and serves until SIGTERM or SIGINT. In process::

    with DnsServer(zone, "127.0.0.1") as server:   # port 0: any free port
        ... server.port ...
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tests.support.sigterm import unwind_on_sigterm

MAX_CHAIN = 16
DEFAULT_TTL = 60


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


class Zone:
    def __init__(self, records: Mapping[str, Mapping]):
        self.records = {_norm(k): dict(v) for k, v in records.items()}

    @classmethod
    def load(cls, path: str | Path) -> Zone:
        return cls(json.loads(Path(path).read_text()))

    def answer(self, query: bytes, tcp: bool) -> bytes | None:
        """The answer to ``query`` or None (silent, or not a query)."""
        try:
            q = dns.message.from_wire(query)
        except Exception:  # noqa: BLE001 - a server for tests ignores garbage
            return None
        if q.flags & dns.flags.QR or len(q.question) != 1:
            return None
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        question = q.question[0]
        name = _norm(question.name.to_text())
        record = self.records.get(name)
        if record is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
            return r.to_wire()
        if record.get("silent"):
            return None
        if record.get("truncate") and not tcp:
            r.flags |= dns.flags.TC
            return r.to_wire()
        for _ in range(MAX_CHAIN):
            ttl = int(record.get("ttl", DEFAULT_TTL))
            owner = dns.name.from_text(name)
            target = record.get("CNAME")
            if target and question.rdtype != dns.rdatatype.CNAME:
                r.answer.append(dns.rrset.from_text(owner, ttl, "IN", "CNAME", _norm(target) + "."))
                name = _norm(target)
                record = self.records.get(name)
                if record is None:
                    break
                continue
            kind = dns.rdatatype.to_text(question.rdtype)
            values = record.get(kind) or []
            if isinstance(values, str):
                values = [values]
            if values:
                r.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", kind, list(values)))
            break
        return r.to_wire(max_size=65535)


class DnsServer:
    """The zone served on ``host``:``port`` over UDP and TCP, each in a
    thread of its own; answers cached by query bytes (without the ID)."""

    def __init__(self, zone: Zone | Mapping, host: str = "127.0.0.1", port: int = 0):
        self.zone = zone if isinstance(zone, Zone) else Zone(zone)
        self.host = host
        self.port = port
        self.received: Counter = Counter()     # ("udp"|"tcp", name) -> queries
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        # (tcp, query without its ID) -> (answer without its ID or None, name)
        self._cache: dict[tuple[bool, bytes], tuple[bytes | None, str]] = {}

    def start(self) -> DnsServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        self._socks = [udp, tcp]
        try:
            udp.bind((self.host, self.port))
            self.port = udp.getsockname()[1]
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.host, self.port))
            tcp.listen(64)
        except OSError:
            self.stop()
            raise
        for sock in (udp, tcp):
            sock.settimeout(0.2)
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in self._socks:
            s.close()
        self._threads, self._socks = [], []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _answer(self, query: bytes, tcp: bool) -> bytes | None:
        if len(query) < 12:
            return None
        key = (tcp, query[2:])
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            try:
                name = _norm(dns.message.from_wire(query).question[0].name.to_text())
            except Exception:  # noqa: BLE001 - counted under "?", never answered
                name = "?"
            answer = self.zone.answer(query, tcp)
            cached = self._cache[key] = (None if answer is None else answer[2:], name)
        self.received["tcp" if tcp else "udp", cached[1]] += 1
        return None if cached[0] is None else query[:2] + cached[0]

    def _serve_udp(self) -> None:
        sock = self._socks[0]
        while not self._stop.is_set():
            try:
                query, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self._answer(query, False)
            if answer is not None:
                try:
                    sock.sendto(answer, peer)
                except OSError:
                    pass

    def _serve_tcp(self) -> None:
        sock = self._socks[1]
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve_conn, args=(conn,), daemon=True)
            t.start()

    def _serve_conn(self, conn: socket.socket) -> None:
        conn.settimeout(0.5)
        with conn:
            buf = b""
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    size = struct.unpack("!H", buf[:2])[0]
                    query, buf = buf[2:2 + size], buf[2 + size:]
                    answer = self._answer(query, True)
                    if answer is not None:
                        try:
                            conn.sendall(struct.pack("!H", len(answer)) + answer)
                        except OSError:
                            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.dnsserver", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", default="127.0.0.1", help="address to bind (UDP and TCP)")
    ap.add_argument("--port", type=int, default=53, help="port; 0 picks one and prints it")
    ap.add_argument("--zone", required=True, help="the zone as a JSON file")
    args = ap.parse_args(argv)
    unwind_on_sigterm()             # SIGTERM unwinds: the sockets close
    server = DnsServer(Zone.load(args.zone), args.listen, args.port).start()
    try:
        if args.port == 0:
            print(f"port {server.port}", flush=True)
        print("ready", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
