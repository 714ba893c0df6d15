"""A directory served by a real SSSD, for benchmarks: OpenLDAP (slapd on
loopback, rfc2307: posixAccount users, posixGroup groups listing their
members by memberUid) holding bench users b<UID> in `team<k>` (k = UID mod
teams) and all in `everyone`, their primary group (as Active Directory's
users are in Domain Users), and SSSD's NSS responder answering for them.

Only inside a private mount namespace (bench.startup's child checks):
nsswitch.conf (``files sss``), /etc/sssd, /var/lib/sss, /var/log/sssd and
a tmpfs on /run are bind-mounted over the machine's, as the identity tests
do (tests/identity/scenario.py); nothing leaks out.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support import polling

from . import common

SUFFIX = "dc=bench,dc=test"
SCHEMAS = [f"/etc/ldap/schema/{s}.schema" for s in ("core", "cosine", "nis", "inetorgperson")]
GROUP_BASE = 300000
STAFF_GID = 299999   # `everyone`: every user's primary group


def ldif(uids: list[int], teams: int) -> str:
    out = [f"dn: {SUFFIX}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\n"
           "o: bench\ndc: bench\n",
           f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n",
           f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n"]
    for uid in uids:
        out.append(f"dn: uid=b{uid},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\n"
                   f"objectClass: posixAccount\nuid: b{uid}\ncn: b{uid}\nsn: b{uid}\n"
                   f"uidNumber: {uid}\ngidNumber: {STAFF_GID}\nhomeDirectory: /nonexistent\n"
                   "loginShell: /usr/sbin/nologin\n")
    groups = {f"team{k}": [u for u in uids if u % teams == k] for k in range(teams)}
    # `everyone` is every user's primary group (as Domain Users is in AD),
    # not a 10,000-value memberUid list: rfc2307 initgroups would fetch
    # that list again for every user
    out.append(f"dn: cn=everyone,ou=groups,{SUFFIX}\nobjectClass: posixGroup\ncn: everyone\n"
               f"gidNumber: {STAFF_GID}\n")
    for i, (name, members) in enumerate(groups.items()):
        out.append(f"dn: cn={name},ou=groups,{SUFFIX}\nobjectClass: posixGroup\ncn: {name}\n"
                   f"gidNumber: {GROUP_BASE + i}\n" + "".join(f"memberUid: b{u}\n" for u in members))
    return "\n".join(out)


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the bench dies, even by SIGKILL."""
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)   # PR_SET_PDEATHSIG


@contextlib.contextmanager
def slapd(work: Path, text: str, probe_uid: str):
    """slapd on a free loopback port, loaded with ``text`` by slapadd; its URI."""
    work.mkdir()
    (work / "db").mkdir()
    conf = work / "slapd.conf"
    conf.write_text(
        "".join(f"include {f}\n" for f in SCHEMAS) +
        "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
        f"pidfile {work / 'slapd.pid'}\nargsfile {work / 'slapd.args'}\n"
        f'database mdb\nmaxsize 1073741824\nsuffix "{SUFFIX}"\n'
        f'rootdn "cn=admin,{SUFFIX}"\nrootpw {os.urandom(9).hex()}\ndirectory {work / "db"}\n'
        "index objectClass eq\nindex uid,memberUid,uidNumber,gidNumber,cn eq\n"
        "access to * by * read\n")
    (work / "base.ldif").write_text(text)
    common.run("slapadd", "-q", "-f", str(conf), "-l", str(work / "base.ldif"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"ldap://127.0.0.1:{port}/"
    with open(work / "slapd.out", "ab") as out:
        proc = subprocess.Popen(["slapd", "-d", "0", "-h", uri, "-f", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        def up():
            if proc.poll() is not None:
                raise RuntimeError(f"slapd exited with {proc.returncode}")
            return common.run("ldapsearch", "-x", "-LLL", "-H", uri, "-b", SUFFIX,
                              f"(uid={probe_uid})", check=False).returncode == 0
        polling.wait_until(up, timeout=30, interval=0.1, what="slapd answering")
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _mounts(work: Path) -> None:
    etc = work / "etc"
    etc.mkdir()
    (etc / "nsswitch.conf").write_text("passwd: files sss\ngroup: files sss\nshadow: files\n")
    (work / "sssd-etc").mkdir(mode=0o711)
    lib = work / "sss-lib"
    for d, mode in (("db", 0o700), ("pipes", 0o755), ("pipes/private", 0o700), ("mc", 0o755),
                    ("pubconf", 0o755), ("gpo_cache", 0o755)):
        (lib / d).mkdir(parents=True, exist_ok=True)
        (lib / d).chmod(mode)
    (work / "sssd-log").mkdir()
    for src, dst in ((etc / "nsswitch.conf", "/etc/nsswitch.conf"),
                     (work / "sssd-etc", "/etc/sssd"), (lib, "/var/lib/sss"),
                     (work / "sssd-log", "/var/log/sssd")):
        common.run("mount", "--bind", str(src), dst)
    common.run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run")
    # SSSD's cache in memory: on disk each stored entry waits for a sync
    common.run("mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", "/var/lib/sss/db")


def _sssd_conf(uri: str) -> None:
    conf = Path("/etc/sssd/sssd.conf")   # the bind mount
    conf.write_text(
        "[sssd]\nconfig_file_version = 2\nservices = nss\ndomains = bench\n\n[nss]\n\n"
        "[domain/bench]\nid_provider = ldap\nldap_id_use_start_tls = false\n"
        f"ldap_uri = {uri}\nldap_search_base = {SUFFIX}\nldap_schema = rfc2307\n"
        "enumerate = false\ncache_credentials = false\nentry_cache_timeout = 3600\n"
        # what large directories run with: a group's member list (10,000
        # for `everyone`) is neither fetched nor stored; initgroups and
        # group names, which ausd asks, are unchanged
        "ignore_group_members = true\n")
    os.chown(conf, 0, 0)
    conf.chmod(0o600)


def warm(uids: list[int], threads: int = 8) -> None:
    """Every user, group list and group looked up once through NSS, so SSSD's
    cache holds them (as on a machine where users have logged in before;
    entry_cache_timeout is long enough for the whole run)."""
    def one(uid: int) -> list[int]:
        pw = pwd.getpwuid(uid)
        return os.getgrouplist(pw.pw_name, pw.pw_gid)
    with ThreadPoolExecutor(threads) as pool:
        gids = {g for found in pool.map(one, uids) for g in found}
        list(pool.map(grp.getgrgid, gids))


@contextlib.contextmanager
def directory(work: Path, uids: list[int], teams: int, log=print):
    """slapd + sssd serving the bench users, SSSD's cache warmed; yields
    how long building and warming took."""
    t0 = time.monotonic()
    _mounts(work)
    sssd = None
    with contextlib.ExitStack() as stack:
        uri = stack.enter_context(slapd(work / "slapd", ldif(uids, teams), f"b{uids[0]}"))
        stack.callback(lambda: _stop(sssd))
        _sssd_conf(uri)
        with open(work / "sssd.out", "ab") as out:
            sssd = subprocess.Popen(["sssd", "-i", "--logger=files", "-d", "1"], stdout=out,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

        def answers():
            if sssd.poll() is not None:
                raise RuntimeError(f"sssd exited with {sssd.returncode}")
            return common.run("getent", "passwd", f"b{uids[0]}", check=False).returncode == 0
        polling.wait_until(answers, timeout=60, interval=0.1, what="sssd answering")
        log(f"sssd pid {sssd.pid} answers for {len(uids)} users from slapd on {uri}")
        built = time.monotonic() - t0
        t1 = time.monotonic()
        warm(uids)
        log(f"sssd cache warmed for {len(uids)} users in {time.monotonic() - t1:.1f} s")
        yield {"built_s": built, "warm_s": time.monotonic() - t1}


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
