"""The lean load client of the fleet benchmark: thousands of simulated
ausd long-polls in one process, each an ``asyncio.Protocol`` on its own
TCP connection that speaks only what a daemon's poll needs.

A workload sends ``GET /api/orgs/{org}/bundle?wait=W&since=V`` with the
daemon's headers (``Accept-Encoding: gzip``, ``If-None-Match``,
``X-Aus-Workload``, ``X-Aus-Enforcing``), reads the answer without
keeping the body (it counts bytes and notes the headers), and polls again
at once with the ETag and version it got, as ausd does. For every 200 it
records when the last byte arrived (``time.monotonic``: the system-wide
clock, comparable with the parent's), the version, the bytes received for
that answer (status line, headers and body, as read from the socket) and
whether it was a delta. Deltas are not applied: the next poll names the
version the answer carried.

Runs in a child process (:func:`serve`), driven over a pipe by the
benchmark: ``open`` (connect and start polling), ``status``,
``records``, ``close``.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time

IP_BIND_ADDRESS_NO_PORT = 24   # linux/in.h: the port is chosen at connect(), per destination


class Fleet:
    def __init__(self, token: str, org: str, wait: int):
        self.token, self.org, self.wait = token, org, wait
        self.polls: list[Poll] = []
        self.records: list[tuple] = []    # (workload, arrived, version, bytes, delta, encoding)
        self.sent = 0                     # requests written
        self.answered_304 = 0
        self.errors: list[str] = []
        self.lost = 0


class Poll(asyncio.Protocol):
    __slots__ = ("fleet", "index", "name", "head", "etag", "version", "transport", "buf",
                 "nbytes", "left", "status", "hdrs", "waiting")

    def __init__(self, fleet: Fleet, index: int, name: str, host: str, etag: str, version: int):
        self.fleet, self.index, self.name = fleet, index, name
        self.head = (f"Host: {host}\r\nAuthorization: Bearer {fleet.token}\r\n"
                     f"Accept-Encoding: gzip\r\nX-Aus-Workload: {name}\r\n").encode()
        self.etag, self.version = etag, version
        self.transport = None
        self.buf = b""
        self.nbytes = 0
        self.left = -1          # body bytes still to come; -1: in the headers
        self.status = 0
        self.hdrs: dict[str, str] = {}
        self.waiting = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        f = self.fleet
        req = (f"GET /api/orgs/{f.org}/bundle?wait={f.wait}&since={self.version} HTTP/1.1\r\n"
               .encode() + self.head +
               f"If-None-Match: {self.etag}\r\nX-Aus-Enforcing: {self.version}\r\n\r\n".encode())
        self.buf, self.nbytes, self.left, self.waiting = b"", 0, -1, True
        self.transport.write(req)
        f.sent += 1

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        if self.left < 0:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            self.hdrs = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                self.hdrs[k.strip().lower()] = v.strip()
            self.left = int(self.hdrs.get("content-length", "0")) - (len(self.buf) - end - 4)
            self.buf = b""
        else:
            self.left -= len(data)
        if self.left <= 0:
            self.answered(time.monotonic())

    def answered(self, now: float) -> None:
        f, h = self.fleet, self.hdrs
        self.waiting = False
        if self.status == 200:
            self.etag = h.get("etag", self.etag)
            self.version = int(h.get("x-aus-version", self.version))
            f.records.append((self.index, now, self.version, self.nbytes,
                              "delta" in h.get("content-type", ""), h.get("content-encoding", "")))
        elif self.status == 304:
            f.answered_304 += 1
        else:
            if len(f.errors) < 5:
                f.errors.append(f"{self.name}: HTTP {self.status}")
            return   # not polled again: the benchmark reports the error
        self.send()

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.waiting:
            self.fleet.lost += 1


async def _open(fleet: Fleet, targets: list[tuple], etag: str, version: int) -> None:
    """Connect every target (index, name, source address, host, port),
    at most 256 connects in flight; each starts polling at once."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(256)

    async def one(index, name, source, host, port):
        async with gate:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((source, 0))
            s.setblocking(False)
            try:
                await loop.sock_connect(s, (host, port))
                poll = Poll(fleet, index, name, f"{host}:{port}", etag, version)
                await loop.create_connection(lambda: poll, sock=s)
                fleet.polls.append(poll)
            except OSError as exc:
                s.close()
                if len(fleet.errors) < 5:
                    fleet.errors.append(f"{name}: connect: {exc}")
    await asyncio.gather(*(one(*t) for t in targets))


async def _main(conn) -> None:
    loop = asyncio.get_running_loop()
    fleet: Fleet | None = None
    inbox: asyncio.Queue = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(conn.recv()))
    while True:
        cmd, arg = await inbox.get()
        if cmd == "open":
            fleet = Fleet(arg["token"], arg["org"], arg["wait"])
            await _open(fleet, arg["targets"], arg["etag"], arg["version"])
            conn.send(len(fleet.polls))
        elif cmd == "status":
            conn.send({"polls": len(fleet.polls), "sent": fleet.sent, "records": len(fleet.records),
                       "waiting": sum(p.waiting for p in fleet.polls), "lost": fleet.lost,
                       "answered_304": fleet.answered_304, "errors": list(fleet.errors)})
        elif cmd == "records":
            conn.send(fleet.records[arg:])
        elif cmd == "close":
            for p in fleet.polls if fleet else ():
                if p.transport is not None:
                    p.transport.abort()
            fleet = None
            await asyncio.sleep(0.2)
            conn.send(True)
        elif cmd == "exit":
            conn.send(True)
            return


def serve(conn) -> None:
    """Child process entry point: raise the open-file limit, then obey
    the pipe until ``exit``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_main(conn))
