"""Whose traffic is it: a socket's identity is the login UID of the task
that created it, whoever uses the socket later.

Real processes in the test cgroup with real login UIDs: a managed user's
server accepting a connection from the destination namespace, a socket
handed to another process over a Unix socket (SCM_RIGHTS), a socket whose
creator changes its login UID before connecting, and TCP fast open (a
connection opened by sendto(MSG_FASTOPEN), never by connect()). The
sudo case and sockets older than ausd are in test_enforcement and
test_lifecycle.
"""

import functools
import json
import socket
import subprocess

import pytest

from aus.core.contract import LOGINUID_UNSET
from tests.support import lab, netns

pytestmark = pytest.mark.kernel

SOCKETS = lab.HERE / "lab_sockets.py"
ALLOWED, DENIED = 80, 443   # for alice (dev-web), towards the peer
LISTEN = 9407               # alice's server on the host side of the veth


@pytest.fixture(scope="module")
def alice(daemon, people):
    u = people[0]["alice"]
    with lab.session(daemon, u.uid):
        yield u


def sockets(*args, **kw) -> subprocess.Popen:
    return lab.spawn([lab.PYTHON, str(SOCKETS), *map(str, args)], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, **kw)


def result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def denied(d, uid) -> int:
    return d.counters()["users"].get(uid, {}).get("denied_packets", 0)


def test_accepted_connection_replies_pass(daemon, peer, cg, alice):
    """A managed user's server answers a connection it accepted, although
    no rule allows the client's address and port: the accepted socket is
    judged as inbound, not as alice's outbound traffic."""
    before = denied(daemon, alice.uid)
    server = sockets("serve", peer.host_v4, LISTEN, cg=cg, loginuid=alice.uid,
                     uid=alice.uid, gid=alice.gid)
    try:
        assert server.stdout.readline().strip() == "listening"
        client = subprocess.run(
            [lab.PYTHON, "-c",
             "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5);"
             "s.sendall(b'hi\\n'); print(s.recv(100).decode().strip())",
             peer.host_v4, str(LISTEN)],
            preexec_fn=functools.partial(netns.enter, peer.ns), capture_output=True, text=True,
            timeout=30)
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == "hi"
        assert result(server)["ok"]
    finally:
        server.kill()
        server.wait()
    assert denied(daemon, alice.uid) == before
    # the same user's own connection to a port no rule allows is refused
    got = lab.act(cg, "tcp", peer.v4, DENIED, loginuid=alice.uid, uid=alice.uid, gid=alice.gid)
    assert got == {"ok": False, "errno": "EPERM"}


@pytest.mark.parametrize("creator, user, allowed", [
    ("alice", "service", False),   # alice's socket in a service's hands is still alice's
    ("service", "alice", True),    # a service's socket in alice's hands is the service's
])
def test_socket_passed_to_another_process_keeps_its_creators_identity(
        daemon, peer, cg, alice, creator, user, allowed):
    who = {"alice": {"loginuid": alice.uid, "uid": alice.uid, "gid": alice.gid},
           "service": {"loginuid": LOGINUID_UNSET}}
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with mine, theirs:
        giver = sockets("give", mine.fileno(), cg=cg, pass_fds=(mine.fileno(),),
                        **who[creator])
        taker = sockets("take", theirs.fileno(), peer.v4, DENIED, cg=cg,
                        pass_fds=(theirs.fileno(),), **who[user])
        assert result(giver)["ok"]
        got = result(taker)
    assert got["ok"] is allowed, got
    if not allowed:
        assert got["errno"] == "EPERM"


@pytest.mark.parametrize("at_creation, at_connect, allowed", [
    ("alice", LOGINUID_UNSET, False),   # sudo dropping the login UID after socket()
    (LOGINUID_UNSET, "alice", True),    # a service's socket, the login set later
])
def test_login_uid_changed_after_socket_creation_does_not_move_the_socket(
        daemon, peer, cg, alice, at_creation, at_connect, allowed):
    uid_of = {"alice": alice.uid, LOGINUID_UNSET: LOGINUID_UNSET}
    got = result(sockets("relogin", peer.v4, DENIED, uid_of[at_connect], cg=cg,
                         loginuid=uid_of[at_creation]))
    assert got["ok"] is allowed, got
    if not allowed:
        assert got["errno"] == "EPERM"


def test_tcp_fast_open_is_judged_like_connect(daemon, peer, cg, alice):
    as_alice = {"cg": cg, "loginuid": alice.uid, "uid": alice.uid, "gid": alice.gid}
    assert result(sockets("fastopen", peer.v4, ALLOWED, **as_alice))["ok"]
    before = denied(daemon, alice.uid)
    got = result(sockets("fastopen", peer.v4, DENIED, **as_alice))
    assert got == {"ok": False, "errno": "EPERM"}
    assert denied(daemon, alice.uid) == before + 1
