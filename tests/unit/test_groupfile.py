"""Users and group lists from local files in one pass: the same answer as
glibc's NSS files, and only when nsswitch.conf names files alone."""

import os
import threading
import time

from aus.agent import groupfile
from aus.agent.lookups import Bounded, LookupPool


def test_files_alone_only():
    assert groupfile.files_only("passwd: files\ngroup: files\nshadow: files\n")
    assert groupfile.files_only("# c\npasswd:   files  # x\ngroup: files\ninitgroups: files\n")
    assert not groupfile.files_only("passwd: files\ngroup: files sss\n")
    assert not groupfile.files_only("passwd: files sss\ngroup: files\n")
    assert not groupfile.files_only("passwd: files\ngroup: files [NOTFOUND=return] ldap\n")
    assert not groupfile.files_only("passwd: files\ngroup: files\ninitgroups: sss\n")
    assert not groupfile.files_only("passwd: compat\ngroup: compat\n")
    assert not groupfile.files_only("")   # glibc's defaults are not ours to guess


def test_table_answers_as_getgrouplist_does():
    t = groupfile.parse(
        "root:x:0:\n# a comment\nstaff:x:50:ann,bob\nbroken line\nbad:x:notanumber:ann\n"
        "dup:x:50:cid\nteam:x:60: ann , \nempty:x:70:\n",
        "ann:x:1000:50::/:/bin/sh\nbob:x:1001:999::/:/bin/sh\nann2:x:1000:60::/:/bin/sh\n")
    assert t.users[1000] == ("ann", 50)            # the first entry of a UID
    assert t.groups_of("ann", 50) == ("staff", "team")   # primary first, no repeat
    assert t.groups_of("bob", 999) == ("staff",)   # a primary GID without a name
    assert t.groups_of("cid", 1) == ("staff",)     # GID 50's first name
    assert t.groups_of("nobody", 70) == ("empty",)


def test_files_only_rereads_changed_files(tmp_path):
    nss, group, passwd = tmp_path / "nss", tmp_path / "group", tmp_path / "passwd"
    nss.write_text("passwd: files\ngroup: files\n")
    group.write_text("dev:x:10:ann\n")
    passwd.write_text("ann:x:1000:1000::/:/bin/sh\n")
    f = groupfile.FilesOnly(str(nss), str(group), str(passwd))
    assert f.table().groups_of("ann", 1000) == ("dev",)
    group.write_text("ops:x:11:ann\n")
    os.utime(group, ns=(time.time_ns() + 10**9,) * 2)
    assert f.table().groups_of("ann", 1000) == ("ops",)
    nss.write_text("passwd: files\ngroup: files sss\n")
    os.utime(nss, ns=(time.time_ns() + 2 * 10**9,) * 2)
    assert f.table() is None


def wait(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_pool_serves_new_users_first_and_reports_overdue_once():
    order, got = [], []
    gate = threading.Event()

    def ask(uid):
        if uid == 99:
            gate.wait()
        order.append(uid)
        return f"answer {uid}"
    pool = LookupPool(ask, lambda uid, a: got.append((uid, a)), workers=1, timeout=0.1)
    assert pool.submit(99)
    pool.start()
    wait(lambda: pool.status()["running"] == 1)
    for uid in (1, 2, 3):
        pool.submit(uid)                 # refreshes
    assert pool.submit(3, priority=1)    # a new user: goes first
    assert not pool.submit(3, priority=1) and not pool.submit(99)
    time.sleep(0.15)
    assert pool.overdue() == [99] and pool.overdue() == []
    gate.set()
    wait(lambda: len(got) == 4)
    assert order == [99, 3, 1, 2] and got[0] == (99, "answer 99")
    st = pool.status()
    assert st["answered"] == 4 and st["timed_out"] == 1 and st["queued"] == 0
    pool.stop()


def test_pool_starts_nothing_while_paused():
    got = []
    pool = LookupPool(lambda uid: uid, lambda uid, a: got.append(uid), workers=2)
    pool.start()
    with pool.paused():
        time.sleep(0.05)
        for uid in range(5):
            pool.submit(uid)
        time.sleep(0.1)
        during = len(got)
    wait(lambda: len(got) == 5)
    assert during == 0
    pool.stop()


def test_bounded_lookup_gives_up_and_caps_blocked_threads():
    gate = threading.Event()
    b = Bounded(lambda uid: gate.wait() and uid, limit=1)
    t0 = time.monotonic()
    assert b(7, 0.1) is None and time.monotonic() - t0 < 1
    assert b(8, 5) is None            # one is blocked: the next is not started
    gate.set()
    wait(lambda: b(9, 1) == 9)
