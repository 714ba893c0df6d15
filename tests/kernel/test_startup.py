"""READY without waiting for the directory: a restart adopts the pinned
maps and tells systemd READY while the directory hangs; the maps keep
enforcing what they hold (real connections), a login is answered
promptly, and once the directory answers the refresh applies a group that
changed while ausd was down.

The directory that hangs is NSS itself: ausd runs in a mount namespace of
its own whose nsswitch.conf says ``files`` and whose /etc/group is a FIFO
no one writes to, so every group lookup blocks in open(); a thread of
this test then feeds the FIFO the new group file, one reader at a time.
"""

import contextlib
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from aus.agent import pins
from aus.agent.ausd import LOGIN_LOOKUP_TIMEOUT
from tests.support import lab
from tests.support.logins import session_open

from .conftest import lab_policy

pytestmark = pytest.mark.kernel

NSSWITCH = "passwd: files\ngroup: files\nshadow: files\n"


def in_own_namespace(d: lab.Ausd, group: Path, nsswitch: Path) -> None:
    """ausd's next start runs with this /etc/group and nsswitch.conf."""
    script = (f"mount --bind {nsswitch} /etc/nsswitch.conf && mount --bind {group} /etc/group"
              f' && exec {lab.PYTHON} -m aus.agent.ausd "$@"')
    d.ausd_cmd = ("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh")


def moved(group_text: str, user: str, old: str, new: str) -> str:
    """/etc/group with ``user`` taken out of ``old`` and put into ``new``."""
    out = []
    for line in group_text.splitlines():
        name, pw, gid, members = line.split(":")
        ms = [m for m in members.split(",") if m and m != user]
        if name == new:
            ms.append(user)
        out.append(":".join([name, pw, gid, ",".join(ms)]))
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def fifo_feeder(path: Path, text: str):
    """Answer each reader of the FIFO with ``text`` until the end."""
    stop = threading.Event()

    def feed():
        while not stop.is_set():
            try:
                with open(path, "w") as f:     # blocks until a reader opens
                    if not stop.is_set():
                        f.write(text)
            except BrokenPipeError:            # the reader went away
                pass
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        # a writer blocked in open() waits for a reader: be one
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        t.join(timeout=5)


def test_restart_is_ready_while_the_directory_hangs(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    work = Path(tempfile.mkdtemp(prefix="aus-test-dir-"))
    work.chmod(0o755)
    try:
        group_file, fifo, nss = work / "group", work / "group.fifo", work / "nsswitch.conf"
        host_group = Path("/etc/group").read_text()
        group_file.write_text(host_group)
        nss.write_text(NSSWITCH)
        os.mkfifo(fifo)
        with lab.ausd(cg, lab_policy(peer, groups)) as d:
            in_own_namespace(d, group_file, nss)
            d.start()
            with lab.session(d, alice.uid):
                def connect(port):
                    return lab.act(cg, "tcp", peer.v4, port, loginuid=alice.uid,
                                   uid=alice.uid, gid=alice.gid)
                assert connect(80)["ok"] and connect(22)["errno"] == "EPERM"
                assert d.stop() == 0
                assert stat.S_ISFIFO(os.stat(fifo).st_mode)

                # the directory hangs: READY all the same, the maps as they were
                in_own_namespace(d, fifo, nss)
                t0 = time.monotonic()
                d.start(timeout=60)
                ready = time.monotonic() - t0
                st = d.ctl_json("status")["directory"]
                assert st["adopted_at_start"] >= 1 and st["adopted_not_refreshed"] >= 1, st
                assert st["answered"] == 0 and st["running"] >= 1, st
                assert connect(80)["ok"] and connect(22)["errno"] == "EPERM"
                row = [u for u in d.ctl_json("users")["users"] if u["login_uid"] == alice.uid]
                assert row and row[0]["groups_source"] == "ADOPTED" and "dev-web" in row[0]["rules"]

                # a login while the directory hangs: answered within the
                # login lookup's time limit, the rules kept
                reply, took = session_open(d.socket, alice.uid)
                assert reply["managed"] and reply.get("adopted") is True, reply
                assert took < LOGIN_LOOKUP_TIMEOUT + 1.5, took
                assert connect(80)["ok"] and connect(22)["errno"] == "EPERM"

                # the directory answers, with alice moved from dev to ops
                # while ausd was down: the refresh applies it
                new = moved(host_group, alice.name, groups["dev"], groups["ops"])
                with fifo_feeder(fifo, new):
                    lab.wait_until(lambda: d.check(alice.uid, peer.v4, "tcp", 22)["allowed"],
                                   timeout=30, what="the refresh to apply ops")
                    assert connect(22)["ok"] and connect(80)["errno"] == "EPERM"
                    st = d.ctl_json("status")["directory"]
                    assert st["adopted_not_refreshed"] == 0 and st["refresh_done"], st
                    row = [u for u in d.ctl_json("users")["users"]
                           if u["login_uid"] == alice.uid][0]
                    assert groups["ops"] in row["groups"] and row["rules"] == ["ops-ssh"]
                    d.stop()
        print(f"READY {ready:.2f} s after spawn with the directory hanging; login {took:.2f} s")
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


def test_same_build_restart_takes_the_attached_programs(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    with lab.ausd(cg, lab_policy(peer, groups)) as d:
        d.start()
        first = pins.program_ids(pins.PinLayout(d.pin_dir))
        with lab.session(d, alice.uid):
            assert d.stop() == 0
            d.start()
            stages = d.ctl_json("status")["start_stages"]
            assert "take the attached programs" in stages and "compile and load" not in stages
            assert pins.program_ids(pins.PinLayout(d.pin_dir)) == first
            assert lab.act(cg, "tcp", peer.v4, 80, loginuid=alice.uid, uid=alice.uid,
                           gid=alice.gid)["ok"]
