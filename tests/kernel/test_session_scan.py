"""The /proc scan that keeps a login UID active: a process that exited but
is not reaped yet (a zombie) still shows its login UID in /proc, and must
not keep the user's rules in the kernel."""

import os
import signal
from pathlib import Path

import pytest

from aus.agent.sessions import is_zombie, scan_loginuids
from tests.support import lab

from .conftest import lab_policy

pytestmark = pytest.mark.kernel


def state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


def test_a_zombie_with_a_login_uid_does_not_keep_the_users_session(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    with lab.ausd(cg, lab_policy(peer, groups)) as d:
        d.start()
        # her only process, found by the scan (no session was opened)
        holder = lab.spawn(["sleep", "600"], loginuid=alice.uid, uid=alice.uid, gid=alice.gid)
        try:
            assert lab.wait_until(lambda: alice.uid in [u["login_uid"] for u in d.ctl_json("maps")["users"]],
                                  what="alice in the maps through the scan")
            assert d.check(alice.uid, peer.v4, "tcp", 80)["allowed"]
            assert not is_zombie(holder.pid) and scan_loginuids([holder.pid]) == {alice.uid: 1}
            # it exits; we, its parent, do not reap it
            os.kill(holder.pid, signal.SIGKILL)
            assert lab.wait_until(lambda: state(holder.pid) == "Z", what="the holder a zombie")
            # /proc still shows her login UID on it
            assert int(Path(f"/proc/{holder.pid}/loginuid").read_text()) == alice.uid
            assert is_zombie(holder.pid) and scan_loginuids([holder.pid]) == {}
            assert lab.wait_until(lambda: alice.uid not in [u["login_uid"] for u in d.ctl_json("maps")["users"]],
                                  timeout=10, what="alice out of the maps")
            res = d.check(alice.uid, peer.v4, "tcp", 80)
            assert not res["allowed"] and res["reason"] == "pending", res
            assert state(holder.pid) == "Z"       # still unreaped all along
        finally:
            if holder.poll() is None:
                holder.kill()
            holder.wait()
