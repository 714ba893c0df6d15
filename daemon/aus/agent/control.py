"""The control socket: one JSON object per line, request then reply.

Anyone may read (status, users, rules, flows); only root may change
anything (reload, session open/close), judged by SO_PEERCRED against the
daemon's command table. The peer's PID also gives the login UID of
``session open``: the caller's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ControlError

MAX_REQUEST = 64 * 1024


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(conn: socket.socket) -> Peer:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


def listen(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        # A socket left by a killed daemon; a live one would have been
        # refused by the pin lock before we got here.
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o666)  # reads are open; writes are checked per request
    sock.listen(64)
    sock.setblocking(False)
    return sock


def read_request(conn: socket.socket, timeout: float = 2.0) -> dict:
    conn.settimeout(timeout)
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    line = buf.split(b"\n", 1)[0]
    req = json.loads(line)
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        raise ValueError('a request is a JSON object with a "cmd" string')
    return req


def send(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


class Client:
    """A connection to ausd's control socket."""

    def __init__(self, path: Path | str, timeout: float = 10.0):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"cannot reach ausd at {self.path}: {exc.strerror or exc}") from exc
        self._buf = b""

    def request(self, cmd: str, **args) -> dict:
        try:
            send(self.sock, {"cmd": cmd, **args})
            reply = self.read()
        except (OSError, ValueError) as exc:
            raise ControlError(f"{cmd}: no valid reply from ausd at {self.path}: {exc}") from exc
        if reply is None:
            raise ControlError(f"{cmd}: ausd at {self.path} closed the connection")
        if not reply.get("ok", False):
            raise ControlError(reply.get("error") or f"{cmd} failed")
        return reply

    def read(self) -> dict | None:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request(path: Path | str, cmd: str, timeout: float = 10.0, **args) -> dict:
    with Client(path, timeout) as c:
        return c.request(cmd, **args)
