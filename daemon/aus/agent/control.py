"""The control socket: one JSON object per line, request then reply.

Anyone may read (status, users, rules, flows); only root may change
anything (reload, session open/close), judged by SO_PEERCRED against the
command table (commands.py). The peer's PID also gives the login UID of
``session open``, and of what a non-root caller may see: its own.

The :class:`Server` reads requests without blocking the daemon's loop,
with a deadline and a size cap per request and caps on what one local
user can hold open, so that no local user can stop or slow the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ControlError
from . import commands
from .commands import MAX_REQUEST

log = logging.getLogger(__name__)


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


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def send(conn: socket.socket, obj: dict) -> None:
    conn.sendall(encode(obj))


# A handler's reply may carry this key: the connection then stays open as
# a follower of the events :meth:`Server.broadcast` sends with the login
# UID it names, or of all events with FOLLOW_ALL.
FOLLOW = "_follow"
FOLLOW_ALL = -1
# With FOLLOW, a reply may name a predicate on the broadcast objects: the
# follower gets only those it accepts.
FOLLOW_MATCH = "_match"


@dataclass(frozen=True)
class Limits:
    """What one local user can hold of the daemon. Root (the PAM hook,
    the administrator) is not counted: a flood from other users must not
    keep logins out."""
    deadline: float = 2.0          # seconds to send a whole request
    reply_deadline: float = 10.0   # seconds to read a reply
    max_request: int = MAX_REQUEST
    per_uid: int = 8               # open connections of one non-root UID
    total: int = 128               # open connections of all non-root UIDs
    followers_per_uid: int = 2
    followers: int = 32            # non-root followers in all
    follower_queue: int = 1 << 20  # bytes queued for one follower; more drops it
    accepts_per_wake: int = 64


_READING, _WRITING, _FOLLOWING = "reading", "writing", "following"


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: Peer
    deadline: float | None
    state: str = _READING
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    follow: int | None = None      # the login UID followed, or FOLLOW_ALL
    match: Callable[[dict], bool] | None = None   # FOLLOW_MATCH
    events: int = 0                # what the selector waits for


class Server:
    """The control socket's connections, served without ever blocking the
    daemon's loop: every socket is non-blocking and waited on by one
    selector, whose descriptor the daemon waits on beside its others
    (:meth:`fileno`); :meth:`service` does what is ready and
    :meth:`timeout` says when the next deadline falls.

    A request must arrive whole within ``deadline`` seconds and
    ``max_request`` bytes; ``handle(line, peer)`` turns it into a reply
    dict and must not raise (see commands.run). Connections and followers
    per non-root UID and in all are capped; a follower that does not read
    its events is dropped once ``follower_queue`` bytes wait for it.
    """

    def __init__(self, listener: socket.socket,
                 handle: Callable[[bytes, Peer], dict], *,
                 limits: Limits = Limits(), clock: Callable[[], float] = time.monotonic,
                 peer: Callable[[socket.socket], Peer] = peer_of):
        self.listener = listener
        self.handle = handle
        self.peer_of = peer   # a seam: tests give connections other UIDs
        self.limits = limits
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, None)
        self.conns: dict[int, _Conn] = {}
        self.refused = 0               # connections refused by a cap
        self.dropped_followers = 0
        self._accept_paused_until = 0.0

    # ---- what the daemon's loop calls --------------------------------------
    def fileno(self) -> int:
        return self.sel.fileno()

    def timeout(self) -> float | None:
        """Seconds until the next deadline (None: none pending)."""
        dl = [c.deadline for c in self.conns.values() if c.deadline is not None]
        if self._accept_paused_until:
            dl.append(self._accept_paused_until)
        return max(0.0, min(dl) - self.clock()) if dl else None

    def service(self) -> None:
        for key, mask in self.sel.select(0):
            if key.data is None:
                self._accept()
                continue
            conn = key.data
            if conn.sock.fileno() < 0 or self.conns.get(conn.sock.fileno()) is not conn:
                continue   # closed earlier in this pass
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and self.conns.get(conn.sock.fileno()) is conn:
                self._read(conn)
        self._expire()

    def broadcast(self, obj: dict, login_uid: int) -> None:
        """``obj`` to every follower of ``login_uid`` and of all events."""
        followers = [c for c in self.conns.values() if c.state == _FOLLOWING
                     and c.follow in (FOLLOW_ALL, login_uid)
                     and (c.match is None or c.match(obj))]
        if not followers:
            return
        line = encode(obj)
        for c in followers:
            if len(c.out) + len(line) > self.limits.follower_queue:
                self.dropped_followers += 1
                log.info("control: dropping a follower (uid %d, pid %d) that does not "
                         "read its events", c.peer.uid, c.peer.pid)
                self._close(c)
                continue
            c.out += line
            self._flush(c)

    def close(self) -> None:
        for c in list(self.conns.values()):
            self._close(c)
        self.sel.close()

    # ---- counts --------------------------------------------------------------
    def open_count(self, uid: int | None = None, *, followers: bool = False) -> int:
        """Open non-root connections (of ``uid``; only followers)."""
        return sum(1 for c in self.conns.values() if c.peer.uid != 0
                   and (uid is None or c.peer.uid == uid)
                   and (not followers or c.state == _FOLLOWING))

    # ---- the steps -------------------------------------------------------------
    def _accept(self) -> None:
        if self._accept_paused_until:
            return
        for _ in range(self.limits.accepts_per_wake):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment
                    # instead of spinning on a listener that stays ready.
                    log.error("control: cannot accept: %s; pausing for 0.1 s", exc)
                    self.sel.unregister(self.listener)
                    self._accept_paused_until = self.clock() + 0.1
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            peer = self.peer_of(sock)
        except OSError:
            sock.close()
            return
        if peer.uid != 0:
            why = None
            if self.open_count(peer.uid) >= self.limits.per_uid:
                why = f"uid {peer.uid} already has {self.limits.per_uid} connections open"
            elif self.open_count() >= self.limits.total:
                why = f"{self.limits.total} connections are open"
            if why:
                self.refused += 1
                log.debug("control: refusing a connection: %s", why)
                with contextlib.suppress(OSError):
                    sock.send(encode({"ok": False, "error": f"busy: {why}; try again later"}))
                sock.close()
                return
        c = _Conn(sock, peer, self.clock() + self.limits.deadline)
        self.conns[sock.fileno()] = c
        self._watch(c, selectors.EVENT_READ)

    def _watch(self, c: _Conn, events: int) -> None:
        if events == c.events:
            return
        if c.events == 0:
            self.sel.register(c.sock, events, c)
        elif events == 0:
            self.sel.unregister(c.sock)
        else:
            self.sel.modify(c.sock, events, c)
        c.events = events

    def _read(self, c: _Conn) -> None:
        try:
            chunk = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._close(c)
            return
        if c.state == _FOLLOWING:
            if not chunk:            # the follower went away
                self._close(c)
            return                   # anything a follower sends is ignored
        if c.state != _READING:
            return
        c.inbuf += chunk
        nl = c.inbuf.find(b"\n")
        if nl >= 0:
            self._answer(c, bytes(c.inbuf[:nl]))
        elif len(c.inbuf) > self.limits.max_request:
            self._fail(c, f"bad request: larger than {self.limits.max_request} bytes")
        elif not chunk:              # EOF: what came is the request
            if c.inbuf:
                self._answer(c, bytes(c.inbuf))
            else:
                self._close(c)

    def _answer(self, c: _Conn, line: bytes) -> None:
        c.inbuf.clear()
        reply = commands.run(lambda: self.handle(line, c.peer), "control request")
        follow = reply.pop(FOLLOW, None)
        match = reply.pop(FOLLOW_MATCH, None)
        if follow is not None and c.peer.uid != 0:
            why = None
            if self.open_count(c.peer.uid, followers=True) >= self.limits.followers_per_uid:
                why = f"uid {c.peer.uid} already follows {self.limits.followers_per_uid} times"
            elif self.open_count(followers=True) >= self.limits.followers:
                why = f"{self.limits.followers} followers are connected"
            if why:
                self.refused += 1
                reply = {"ok": False, "error": f"busy: {why}; try again later"}
                follow = None
        c.out += encode(reply)
        if follow is not None:
            c.state, c.follow, c.match, c.deadline = _FOLLOWING, follow, match, None
        else:
            c.state, c.deadline = _WRITING, self.clock() + self.limits.reply_deadline
        self._flush(c)

    def _fail(self, c: _Conn, text: str) -> None:
        c.inbuf.clear()
        c.out += encode({"ok": False, "error": text})
        c.state, c.deadline = _WRITING, self.clock() + self.limits.reply_deadline
        self._flush(c)

    def _flush(self, c: _Conn) -> None:
        while c.out:
            try:
                n = c.sock.send(c.out)
            except BlockingIOError:
                break
            except OSError:
                self._close(c)
                return
            del c.out[:n]
        if c.out:
            self._watch(c, selectors.EVENT_WRITE | (selectors.EVENT_READ
                                                    if c.state == _FOLLOWING else 0))
        elif c.state == _WRITING:
            self._close(c)
        else:
            self._watch(c, selectors.EVENT_READ)

    def _expire(self) -> None:
        now = self.clock()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self.sel.register(self.listener, selectors.EVENT_READ, None)
        for c in [c for c in self.conns.values() if c.deadline is not None and now >= c.deadline]:
            if c.state == _READING:
                log.debug("control: request of uid %d not complete within %.1f s",
                          c.peer.uid, self.limits.deadline)
                self._fail(c, f"bad request: not complete within {self.limits.deadline:g} s")
                if self.conns.get(c.sock.fileno()) is c and c.out:
                    self._close(c)   # the reply did not fit: no second chance
            else:
                self._close(c)

    def _close(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if self.conns.get(fd) is c:
            del self.conns[fd]
            self._watch(c, 0)
        with contextlib.suppress(OSError):
            c.sock.close()


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
