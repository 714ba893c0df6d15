"""The control socket's server over real UNIX sockets, driven by a loop
like ausd's: a request that never ends, or never stops, costs its sender
a connection and nothing else; caps hold per UID and in all; a follower
that does not read is dropped; the loop never waits on a client."""

from __future__ import annotations

import itertools
import json
import os
import selectors
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from aus.agent import commands, control
from aus.agent.control import FOLLOW, FOLLOW_ALL, Limits, Peer, Server
from aus.agent.sessions import read_loginuid, viewer_of
from aus.core.contract import LOGINUID_UNSET
from tests.support.polling import wait_until


class Loop:
    """A Server on a fresh socket, served by a thread that does what
    ausd's main loop does. ``uids`` gives the peer UID of each new
    connection, in order (the SO_PEERCRED seam)."""

    def __init__(self, limits: Limits, uids=None, handle=None):
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "ctl.sock"
        listener = control.listen(self.path)
        uids = iter(uids) if uids is not None else itertools.repeat(1000)
        self.server = Server(listener, handle or self.handle, limits=limits,
                             peer=lambda s: Peer(1, next(uids), 1000))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @staticmethod
    def handle(line: bytes, peer: Peer) -> dict:
        req = commands.parse(line)
        reply = {"ok": True, "cmd": req.cmd, "uid": peer.uid}
        if req.cmd == "flows" and req.args["follow"]:
            reply[FOLLOW] = FOLLOW_ALL
        return reply

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ)
        while not self.stop.is_set():
            t = self.server.timeout()
            sel.select(0.05 if t is None else min(t, 0.05))
            self.server.service()

    def call(self, fn):
        """Run ``fn`` in the loop's thread (the server is not thread-safe)."""
        done = threading.Event()
        out = []
        orig = self.server.service

        def once():
            self.server.service = orig
            out.append(fn())
            done.set()
            orig()
        self.server.service = once
        assert done.wait(5)
        return out[0]

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(self.path))
        return s

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()
        self.server.listener.close()
        self.dir.cleanup()


@pytest.fixture
def loop_of():
    made = []

    def make(**kw):
        limits = Limits(**{k: v for k, v in kw.items() if k not in ("uids", "handle")})
        lp = Loop(limits, kw.get("uids"), kw.get("handle"))
        made.append(lp)
        return lp
    yield make
    for lp in made:
        lp.close()


def read_reply(s: socket.socket) -> dict | None:
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return None if not buf else json.loads(buf)
        buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def closed(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True


def ask(lp: Loop, obj) -> dict:
    with lp.connect() as s:
        s.sendall(json.dumps(obj).encode() + b"\n")
        return read_reply(s)


def test_a_request_gets_its_reply_and_the_connection_ends(loop_of):
    lp = loop_of()
    with lp.connect() as s:
        s.sendall(b'{"cmd":"status"}\n')
        assert read_reply(s) == {"ok": True, "cmd": "status", "uid": 1000}
        assert closed(s)
    # a request without a newline ends at the client's half-close
    with lp.connect() as s:
        s.sendall(b'{"cmd":"users"}')
        s.shutdown(socket.SHUT_WR)
        assert read_reply(s)["cmd"] == "users"
    # a hostile one gets its error, and the server goes on
    assert ask(lp, {"cmd": "flows", "limit": []})["error"].startswith(
        "flows: field 'limit' must be an integer")
    with lp.connect() as s:
        s.sendall(b'{"cmd":"flows","limit":Infinity}\n')
        assert read_reply(s) == {"ok": False,
                                 "error": "bad request: Infinity is not a JSON number"}
    assert lp.call(lambda: len(lp.server.conns)) == 0


def test_a_handler_that_raises_costs_one_error_reply(loop_of):
    def handle(line, peer):
        raise TypeError("int() argument must be a string, not 'list'")
    lp = loop_of(handle=handle)
    reply = ask(lp, {"cmd": "rules"})
    assert reply == {"ok": False, "error": "control request: internal error (TypeError); "
                     "see ausd's log"}
    assert ask(lp, {"cmd": "status"})["ok"] is False   # still serving


def test_a_slow_request_hits_the_deadline_while_others_are_served(loop_of):
    lp = loop_of(deadline=0.5)
    slow = lp.connect()
    t0 = time.monotonic()
    slow.sendall(b'{"cmd":')
    # while the slow one dribbles, others get their replies at once
    for _ in range(5):
        t = time.monotonic()
        assert ask(lp, {"cmd": "status"})["ok"]
        assert time.monotonic() - t < 0.3
        slow.sendall(b" ")
    reply = read_reply(slow)
    took = time.monotonic() - t0
    assert reply == {"ok": False, "error": "bad request: not complete within 0.5 s"}
    assert 0.45 <= took < 2.0, took
    assert closed(slow)
    slow.close()


def test_a_silent_connection_is_closed_at_the_deadline(loop_of):
    lp = loop_of(deadline=0.3)
    with lp.connect() as s:
        assert read_reply(s)["error"] == "bad request: not complete within 0.3 s"
    assert lp.call(lambda: len(lp.server.conns)) == 0


def test_an_oversize_request_is_refused_without_waiting_for_its_end(loop_of):
    lp = loop_of(deadline=5.0)
    with lp.connect() as s:
        s.settimeout(5)
        t = time.monotonic()
        try:
            s.sendall(b"[" * (commands.MAX_REQUEST + 1))
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = read_reply(s)
        assert reply == {"ok": False, "error": "bad request: larger than 65536 bytes"}
        assert time.monotonic() - t < 2.0
    # a complete line over the cap is refused by the command table too
    with lp.connect() as s:
        s.sendall(json.dumps({"cmd": "status", "x": "y" * 70000}).encode() + b"\n")
        assert "larger than 65536 bytes" in read_reply(s)["error"]


def test_connections_are_capped_per_uid_and_in_all(loop_of):
    # uids: five of 1000, then 1001 x3, then root x3
    lp = loop_of(per_uid=4, total=6, uids=[1000] * 5 + [1001] * 3 + [0] * 3)
    held = [lp.connect() for _ in range(4)]
    wait_until(lambda: lp.call(lambda: lp.server.open_count(1000)) == 4)
    with lp.connect() as fifth:
        assert read_reply(fifth) == {"ok": False, "error": "busy: uid 1000 already has 4 "
                                     "connections open; try again later"}
    others = [lp.connect() for _ in range(2)]
    wait_until(lambda: lp.call(lambda: lp.server.open_count()) == 6)
    with lp.connect() as third:
        assert "busy: 6 connections are open" in read_reply(third)["error"]
    # root is never counted: the PAM hook gets through a flood
    for _ in range(3):
        with lp.connect() as s:
            s.sendall(b'{"cmd":"status"}\n')
            assert read_reply(s) == {"ok": True, "cmd": "status", "uid": 0}
    assert lp.call(lambda: lp.server.refused) == 2
    for s in held + others:
        s.close()
    wait_until(lambda: lp.call(lambda: len(lp.server.conns)) == 0)


def test_followers_are_capped_and_a_slow_one_is_dropped(loop_of):
    lp = loop_of(followers_per_uid=2, followers=3, follower_queue=64 * 1024,
                 uids=[1000, 1000, 1000, 1001, 1002, 1003])
    fs = []
    for _ in range(2):
        s = lp.connect()
        s.sendall(b'{"cmd":"flows","follow":true}\n')
        assert read_reply(s)["ok"]
        fs.append(s)
    with lp.connect() as s:
        s.sendall(b'{"cmd":"flows","follow":true}\n')
        assert read_reply(s) == {"ok": False, "error": "busy: uid 1000 already follows "
                                 "2 times; try again later"}
    s = lp.connect()            # uid 1001: the third and last follower
    s.sendall(b'{"cmd":"flows","follow":true}\n')
    assert read_reply(s)["ok"]
    fs.append(s)
    with lp.connect() as s:     # uid 1002: over the total
        s.sendall(b'{"cmd":"flows","follow":true}\n')
        assert "busy: 3 followers are connected" in read_reply(s)["error"]
    # a plain request of the same uid still works
    with lp.connect() as s:     # uid 1003
        s.sendall(b'{"cmd":"flows"}\n')
        assert read_reply(s)["ok"]

    # events flow to followers; one that never reads is dropped once its
    # queue is full, and the others keep getting theirs
    reader, slow = fs[0], fs[1]
    got = []

    def pump():
        reader.settimeout(0.01)
        try:
            while True:
                chunk = reader.recv(1 << 20)
                if not chunk:
                    break
                got.append(chunk)
        except TimeoutError:
            pass
    event = {"ok": True, "flow": {"pad": "x" * 1000}}

    def burst():
        for _ in range(50):
            lp.server.broadcast(event, 1000)
        return lp.server.dropped_followers
    for _ in range(100):
        dropped = lp.call(burst)
        pump()
        if dropped:
            break
    assert lp.call(lambda: lp.server.dropped_followers) == 2   # slow ones: fs[1], fs[2]
    assert closed(slow)
    lp.call(lambda: lp.server.broadcast({"ok": True, "flow": {"last": 1}}, 1000))
    wait_until(lambda: pump() or b'"last":1' in b"".join(got), what="the last event")
    assert lp.call(lambda: lp.server.open_count(followers=True)) == 1
    for s in fs:
        s.close()


def test_a_follower_that_hangs_up_is_forgotten(loop_of):
    lp = loop_of()
    s = lp.connect()
    s.sendall(b'{"cmd":"flows","follow":true}\n')
    assert read_reply(s)["ok"]
    assert lp.call(lambda: lp.server.open_count(followers=True)) == 1
    s.close()
    wait_until(lambda: lp.call(lambda: len(lp.server.conns)) == 0, what="the follower gone")


def test_what_a_peer_may_see():
    me = os.getpid()
    owner = os.stat(f"/proc/{me}").st_uid
    assert viewer_of(Peer(me, 0, 0)) is None                       # root: everyone
    # a PID that is gone, or that now belongs to another user (reused):
    # the peer's own UID, never someone else's login UID
    assert viewer_of(Peer(2**22 + 17, 1234, 1234)) == 1234
    assert viewer_of(Peer(me, owner + 1, 0)) == owner + 1
    if owner != 0:   # run unprivileged: our own login UID, or our UID without one
        expected = read_loginuid(me)
        assert viewer_of(Peer(me, owner, 0)) == (owner if expected in (None, LOGINUID_UNSET)
                                                 else expected)
