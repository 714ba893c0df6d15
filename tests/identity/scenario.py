"""A directory user's login through a real identity stack, end to end.

Run only inside a private mount namespace, as root:

    unshare -m --propagation private .venv/bin/python tests/identity/scenario.py WORKDIR

It builds, all in WORKDIR and visible to nothing outside this mount
namespace (see /work/shared/design/identity-facts.md):

    slapd     a throwaway OpenLDAP on 127.0.0.1:<free port>, rfc2307 users
              alice (41001, in dev) and bob (41002, in ops) loaded by slapadd
    slapd     a second one, rfc2307bis (groups list member DNs, so a group
              can be a member of another) with AD-style binary objectSids on
              the groups: carol (43001, in inner, which is in outer, and in
              dbadm) and dave (43002, in support)
    sssd      domains `corp` and `nest` on them, in the foreground
    NSS/PAM   /etc/nsswitch.conf (`sss`), /etc/sssd, /etc/pam.d (the host's
              copy plus the service `aus-test`: pam_loginuid, then pam_exec
              of the aus PAM hook), /var/lib/sss, /var/log/sssd and a tmpfs
              on /run, all bind-mounted over the host's paths
    lab       the kernel tests' peer namespace, cgroup and ausd
              (tests/support/lab.py)

then logs users in and out with pamtester, changes groups in LDAP (a
nested group's membership too), stops sssd and ausd, and records what real
traffic saw. The policy names outer (reached only through inner) by name
and dbadm only by its SID, under another name. It prints ONE JSON object
on stdout, {"setup": {...}, "cases": {name: observations}}; the pytest side
(test_identity_stack.py) asserts. Progress and logs go to stderr. Every
process, namespace, cgroup and pin it made is removed in ``finally``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support import lab, sigterm  # noqa: E402

HERE = Path(__file__).resolve().parent
SHIPPED_HOOK = HERE.parents[1] / "packaging" / "pam" / "aus-pam-hook"
PYTHON = sys.executable
SUFFIX = "dc=corp,dc=test"
SERVICE = "aus-test"
GROUPS_TTL = 1.0
SCAN_INTERVAL = 0.2

# name: (uid, primary gid, supplementary groups)
USERS = {"alice": (41001, 41001, ["dev"]), "bob": (41002, 41002, ["ops"])}
GROUPS = {"dev": 42001, "ops": 42002}

# The rfc2307bis directory (SSSD domain `nest`). Groups name their members
# by DN, users and groups alike: carol is in inner, inner is in outer.
BIS_SUFFIX = "dc=nest,dc=test"
BIS_USERS = {"carol": (43001, 43001, ["inner", "dbadm"]), "dave": (43002, 43002, ["support"])}
DOMAIN_SID = "S-1-5-21-3623811015-3361044348-30300820"
# name: (gid, RID of its objectSid, groups that are members)
BIS_GROUPS = {"inner": (44001, 1101, []), "outer": (44002, 1102, ["inner"]),
              "dbadm": (44003, 1103, []), "support": (44004, 1104, [])}
ACCOUNTS = {**USERS, **BIS_USERS}

# Debian's slapd has no rfc2307bis schema: this one stands in for nis.schema
# in the second slapd. posixGroup is AUXILIARY, so a group entry is a
# groupOfNames (member DNs) that is also a posixGroup. objectSid is Active
# Directory's attribute (binary SID), carried by AD's auxiliary class
# securityPrincipal. (uidNumber and gidNumber are built into slapd 2.5.)
RFC2307BIS_SCHEMA = """\
attributetype ( 1.3.6.1.1.1.1.2 NAME 'gecos' EQUALITY caseIgnoreIA5Match
  SUBSTR caseIgnoreIA5SubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 SINGLE-VALUE )
attributetype ( 1.3.6.1.1.1.1.3 NAME 'homeDirectory' EQUALITY caseExactIA5Match
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 SINGLE-VALUE )
attributetype ( 1.3.6.1.1.1.1.4 NAME 'loginShell' EQUALITY caseExactIA5Match
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 SINGLE-VALUE )
attributetype ( 1.3.6.1.1.1.1.12 NAME 'memberUid' EQUALITY caseExactIA5Match
  SUBSTR caseExactIA5SubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 )
objectclass ( 1.3.6.1.1.1.2.0 NAME 'posixAccount' SUP top AUXILIARY
  MUST ( cn $ uid $ uidNumber $ gidNumber $ homeDirectory )
  MAY ( userPassword $ loginShell $ gecos $ description ) )
objectclass ( 1.3.6.1.1.1.2.2 NAME 'posixGroup' SUP top AUXILIARY
  MUST gidNumber MAY ( userPassword $ memberUid $ description ) )
attributetype ( 1.2.840.113556.1.4.146 NAME 'objectSid' EQUALITY octetStringMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 SINGLE-VALUE )
objectclass ( 1.2.840.113556.1.5.6 NAME 'securityPrincipal' SUP top AUXILIARY
  MUST objectSid )
"""

T0 = time.monotonic()


class Terminated(BaseException):
    """SIGTERM (the test's timeout): unwind, so that ``finally`` cleans up."""


def _terminated() -> None:
    raise Terminated()


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the scenario dies, even by
    SIGKILL, so a killed run leaves no slapd or sssd behind."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def log(msg: str) -> None:
    print(f"[scenario {time.monotonic() - T0:7.2f}s] {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str, check: bool = True, input: str | None = None, timeout: float = 60,
       **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


# ---- the private mount namespace --------------------------------------------

def assert_private_mount_ns() -> None:
    """Refuse to touch /etc unless this is a mount namespace of its own
    (not the one of the process that started us) and no mount in it
    propagates anywhere."""
    mine = os.readlink("/proc/self/ns/mnt")
    outer = os.environ.get("AUS_OUTER_MNT_NS")
    with contextlib.suppress(OSError):
        outer = os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    if outer is None or outer == mine:
        raise SystemExit("scenario.py: not in a private mount namespace; run it under "
                         "`unshare -m --propagation private`")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if any(f.startswith("shared:") for f in fields[6:fields.index("-")]):
            raise SystemExit(f"scenario.py: {fields[4]} propagates mounts; run it under "
                             "`unshare -m --propagation private`")


def bind(src: Path, target: str) -> None:
    sh("mount", "--bind", str(src), target)


def build_mounts(work: Path, hook: Path) -> None:
    etc = work / "etc"
    etc.mkdir()
    (etc / "nsswitch.conf").write_text(
        "passwd:     files sss\n"
        "group:      files sss\n"
        "shadow:     files sss\n"
        "hosts:      files dns\n"
        "networks:   files\n"
        "protocols:  db files\n"
        "services:   db files\n"
        "ethers:     db files\n"
        "rpc:        db files\n"
        "netgroup:   files\n")
    sssd_etc = work / "sssd-etc"
    sssd_etc.mkdir(mode=0o711)
    pamd = work / "pam.d"
    shutil.copytree("/etc/pam.d", pamd, symlinks=True)
    (pamd / SERVICE).write_text(
        "# aus identity test: LDAP users through SSSD, then the aus session hook\n"
        "auth     sufficient pam_sss.so\n"
        "auth     required   pam_deny.so\n"     # (pam_permit would let a wrong password in)
        "account  required   pam_permit.so\n"
        "session  required   pam_loginuid.so\n"
        f"session  optional   pam_exec.so quiet log={work / 'pam-hook.log'} {hook}\n")
    sss_lib = work / "sss-lib"
    for d, mode in (("db", 0o700), ("pipes", 0o755), ("pipes/private", 0o700), ("mc", 0o755),
                    ("pubconf", 0o755), ("gpo_cache", 0o755)):
        (sss_lib / d).mkdir(parents=True, exist_ok=True)
        (sss_lib / d).chmod(mode)
    sss_log = work / "sssd-log"
    sss_log.mkdir()

    bind(etc / "nsswitch.conf", "/etc/nsswitch.conf")
    bind(sssd_etc, "/etc/sssd")
    bind(pamd, "/etc/pam.d")
    bind(sss_lib, "/var/lib/sss")
    bind(sss_log, "/var/log/sssd")
    # sssd writes /run/sssd.pid; the tmpfs also hides any nscd socket that
    # would answer NSS from outside this namespace. `ip netns add` makes
    # /run/netns itself.
    sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run")


# ---- slapd ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ldif_tree(suffix: str, users: dict, passwords: dict[str, str]) -> list[str]:
    """The suffix, ou=people and ou=groups, and the users' entries."""
    dc = suffix.split(",")[0].split("=")[1]
    out = [f"dn: {suffix}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\n"
           f"o: {dc}\ndc: {dc}\n",
           f"dn: ou=people,{suffix}\nobjectClass: organizationalUnit\nou: people\n",
           f"dn: ou=groups,{suffix}\nobjectClass: organizationalUnit\nou: groups\n"]
    for name, (uid, gid, _) in users.items():
        hashed = sh("slappasswd", "-s", passwords[name]).stdout.strip()
        out.append(f"dn: uid={name},ou=people,{suffix}\nobjectClass: inetOrgPerson\n"
                   f"objectClass: posixAccount\nuid: {name}\ncn: {name.title()}\nsn: {name.title()}\n"
                   f"uidNumber: {uid}\ngidNumber: {gid}\nhomeDirectory: /nonexistent\n"
                   f"loginShell: /usr/sbin/nologin\nuserPassword: {hashed}\n")
    return out


def ldif_base(passwords: dict[str, str]) -> str:
    out = ldif_tree(SUFFIX, USERS, passwords)
    for name, (uid, gid, _) in USERS.items():
        out.append(f"dn: cn={name},ou=groups,{SUFFIX}\nobjectClass: posixGroup\n"
                   f"cn: {name}\ngidNumber: {gid}\n")
    for group, gid in GROUPS.items():
        members = "".join(f"memberUid: {n}\n" for n, (_, _, gs) in USERS.items() if group in gs)
        out.append(f"dn: cn={group},ou=groups,{SUFFIX}\nobjectClass: posixGroup\n"
                   f"cn: {group}\ngidNumber: {gid}\n{members}")
    return "\n".join(out)


def sid_bytes(sid: str) -> bytes:
    """A SID in the binary form AD stores in objectSid: revision, number of
    sub-authorities, 48-bit big-endian authority, little-endian
    sub-authorities."""
    _, rev, auth, *subs = sid.split("-")
    return (struct.pack("<BB", int(rev), len(subs)) + int(auth).to_bytes(6, "big")
            + b"".join(struct.pack("<I", int(s)) for s in subs))


def bis_dn(name: str) -> str:
    kind = "uid={},ou=people" if name in BIS_USERS else "cn={},ou=groups"
    return f"{kind.format(name)},{BIS_SUFFIX}"


def ldif_bis(passwords: dict[str, str]) -> str:
    out = ldif_tree(BIS_SUFFIX, BIS_USERS, passwords)
    for name, (uid, gid, _) in BIS_USERS.items():
        # groupOfNames needs a member: the user of a user private group
        out.append(f"dn: cn={name},ou=groups,{BIS_SUFFIX}\nobjectClass: groupOfNames\nobjectClass: posixGroup\n"
                   f"cn: {name}\ngidNumber: {gid}\nmember: {bis_dn(name)}\n")
    for group, (gid, rid, inside) in BIS_GROUPS.items():
        members = [n for n, (_, _, gs) in BIS_USERS.items() if group in gs] + inside
        sid = base64.b64encode(sid_bytes(f"{DOMAIN_SID}-{rid}")).decode()
        out.append(f"dn: {bis_dn(group)}\nobjectClass: groupOfNames\nobjectClass: posixGroup\n"
                   f"objectClass: securityPrincipal\ncn: {group}\ngidNumber: {gid}\n"
                   f"objectSid:: {sid}\n" + "".join(f"member: {bis_dn(m)}\n" for m in members))
    return "\n".join(out)


class Slapd:
    def __init__(self, dir: Path, suffix: str, schemas: list[str], ldif: str, probe: str):
        """A slapd serving ``suffix`` from ``dir``, with the schema files
        ``schemas``, loaded with ``ldif``; up once ``probe`` (a filter) answers."""
        self.dir = dir
        self.db = self.dir / "db"
        self.db.mkdir(parents=True)
        self.suffix, self.rootdn = suffix, f"cn=admin,{suffix}"
        self.schemas, self.ldif, self.probe = schemas, ldif, probe
        self.rootpw = os.urandom(9).hex()
        self.pidfile = self.dir / "slapd.pid"
        self.conf = self.dir / "slapd.conf"
        self.port = 0
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}/"

    def start(self) -> None:
        self.conf.write_text(
            "".join(f"include {f}\n" for f in self.schemas) +
            "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
            f"pidfile {self.pidfile}\nargsfile {self.dir / 'slapd.args'}\n"
            "database mdb\nmaxsize 104857600\n"
            f'suffix "{self.suffix}"\nrootdn "{self.rootdn}"\nrootpw {self.rootpw}\n'
            f"directory {self.db}\n"
            "index objectClass eq\nindex uid,memberUid,member,uidNumber,gidNumber,cn eq\n"
            "access to attrs=userPassword by self write by anonymous auth by * none\n"
            "access to * by * read\n")
        ldif = self.dir / "base.ldif"
        ldif.write_text(self.ldif)
        sh("slapadd", "-f", str(self.conf), "-l", str(ldif))
        out = self.dir / "slapd.out"
        for attempt in range(5):
            self.port = free_port()
            # -d 0: in the foreground (our child, so it dies with us), no debug output
            with open(out, "ab") as f:
                self.proc = subprocess.Popen(["slapd", "-d", "0", "-h", self.uri, "-f", str(self.conf)],
                                             stdout=f, stderr=subprocess.STDOUT,
                                             preexec_fn=die_with_parent)
            self.pid = self.proc.pid

            def up():
                if self.proc.poll() is not None:
                    return "exited"
                return self.search(self.probe).returncode == 0
            if lab.wait_until(up, timeout=10, interval=0.1, what="slapd answering") is True:
                break
            log(f"slapd on port {self.port} exited ({self.proc.returncode}): {tail(out, 5)}; retrying")
            self.pid = None
        else:
            raise RuntimeError("slapd would not start")
        pidfile = int(self.pidfile.read_text().strip())
        assert pidfile == self.pid, (pidfile, self.pid)
        log(f"slapd pid {self.pid} on {self.uri}")

    def search(self, flt: str, *attrs: str) -> subprocess.CompletedProcess:
        return sh("ldapsearch", "-x", "-LLL", "-H", self.uri, "-b", self.suffix, flt, *attrs,
                  check=False)

    def values(self, flt: str, attr: str) -> list[str]:
        """``attr`` of every entry matching ``flt`` (unwrapped, -o ldif-wrap=no)."""
        p = sh("ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", self.uri, "-b", self.suffix,
               flt, attr)
        return sorted(l.split(": ", 1)[1] for l in p.stdout.splitlines() if l.startswith(f"{attr}: "))

    def modify(self, ldif: str) -> subprocess.CompletedProcess:
        return sh("ldapmodify", "-x", "-H", self.uri, "-D", self.rootdn, "-w", self.rootpw,
                  input=ldif, check=False)

    def stop(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        t = time.monotonic()
        try:
            self.proc.wait(timeout=10)         # about 1.5 s
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log(f"slapd pid {self.pid} stopped ({self.proc.returncode}) in {time.monotonic() - t:.2f}s")
        self.pid = None


# ---- sssd ---------------------------------------------------------------------

class Sssd:
    def __init__(self, work: Path, corp_uri: str, nest_uri: str):
        self.work = work
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []
        common = ("id_provider = ldap\nauth_provider = ldap\n"
                  "ldap_id_use_start_tls = false\n"
                  "ldap_auth_disable_tls_never_use_in_production = true\n"
                  "entry_cache_timeout = 2\ncache_credentials = false\nenumerate = false\n")
        conf = Path("/etc/sssd/sssd.conf")  # our bind mount
        conf.write_text(
            "[sssd]\nconfig_file_version = 2\nservices = nss, pam\ndomains = corp, nest\n\n"
            # no initgroups fast cache (a documented setting): with sssd
            # stopped, getpwnam still answers from the fast cache but
            # getgrouplist() falls back to the primary group
            "[nss]\nmemcache_size_initgroups = 0\n\n[pam]\n\n"
            "[domain/corp]\n" + common +
            f"ldap_uri = {corp_uri}\nldap_search_base = {SUFFIX}\nldap_schema = rfc2307\n\n"
            # rfc2307bis: members are DNs and SSSD follows groups inside groups
            # (ldap_group_nesting_level, 2 by default). SSSD reads a group's
            # SID from the attribute ldap_group_objectsid names, which the
            # rfc2307 and rfc2307bis schemas leave unset: without it, no SIDs.
            "[domain/nest]\n" + common +
            f"ldap_uri = {nest_uri}\nldap_search_base = {BIS_SUFFIX}\nldap_schema = rfc2307bis\n"
            "ldap_group_objectsid = objectSid\n")
        os.chown(conf, 0, 0)
        conf.chmod(0o600)

    def start(self) -> float:
        t = time.monotonic()
        out = open(self.work / "sssd.out", "ab")
        self.proc = subprocess.Popen(["sssd", "-i", "--logger=files", "-d", "2"],
                                     stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        self.pids.append(self.proc.pid)
        out.close()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"sssd exited with {self.proc.returncode}:\n"
                                   f"{tail(Path('/var/log/sssd/sssd.log'))}")
            return all(sh("getent", "passwd", u, check=False).returncode == 0 for u in ("alice", "carol"))
        lab.wait_until(ready, timeout=30, interval=0.1, what="getent passwd alice and carol via sssd")
        log(f"sssd pid {self.proc.pid} answers")
        return time.monotonic() - t

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log(f"sssd pid {self.proc.pid} stopped ({self.proc.returncode})")
        return self.proc.returncode


# ---- the scenario ---------------------------------------------------------------

class Scenario:
    def __init__(self, work: Path, stack: contextlib.ExitStack):
        self.work = work
        self.stack = stack
        self.passwords = {n: f"{n}-{os.urandom(6).hex()}" for n in ACCOUNTS}
        self.shells: dict[str, subprocess.Popen] = {}   # login stand-ins
        self.pids: dict[str, list[int]] = {"shells": []}
        self.setup: dict = {}

    # -- building ---------------------------------------------------------------
    def build(self) -> None:
        t = time.monotonic()
        assert_private_mount_ns()
        hook = self.work / "pam-hook.sh"
        self.setup["hook"] = str(hook)
        build_mounts(self.work, hook)
        self.setup["mounts"] = [l.split()[4] for l in Path("/proc/self/mountinfo").read_text().splitlines()
                                if l.split()[4] in ("/etc/nsswitch.conf", "/etc/sssd", "/etc/pam.d",
                                                    "/var/lib/sss", "/var/log/sssd", "/run")]

        s = "/etc/ldap/schema"
        self.slapd = Slapd(self.work / "ldap", SUFFIX,
                           [f"{s}/core.schema", f"{s}/cosine.schema", f"{s}/nis.schema",
                            f"{s}/inetorgperson.schema"],
                           ldif_base(self.passwords), "(uid=alice)")
        self.stack.callback(self.slapd.stop)
        self.slapd.start()
        self.pids["slapd"] = [self.slapd.pid]
        self.setup["ldap_uri"] = self.slapd.uri
        bis_schema = self.work / "rfc2307bis.schema"
        bis_schema.write_text(RFC2307BIS_SCHEMA)
        self.slapd_bis = Slapd(self.work / "ldap-bis", BIS_SUFFIX,
                               [f"{s}/core.schema", f"{s}/cosine.schema", str(bis_schema),
                                f"{s}/inetorgperson.schema"],
                               ldif_bis(self.passwords), "(uid=carol)")
        self.stack.callback(self.slapd_bis.stop)
        self.slapd_bis.start()
        self.pids["slapd"].append(self.slapd_bis.pid)
        self.setup["ldap_bis_uri"] = self.slapd_bis.uri

        self.sssd = Sssd(self.work, self.slapd.uri, self.slapd_bis.uri)
        self.stack.callback(self.sssd.stop)
        self.setup["sssd_ready_s"] = round(self.sssd.start(), 3)
        self.pids["sssd"] = self.sssd.pids
        self.setup["getent"] = {n: sh("getent", "passwd", n).stdout.strip() for n in ACCOUNTS}
        self.setup["id"] = {n: sh("id", n, check=False).stdout.strip() for n in ACCOUNTS}
        # What SSSD itself reports, asked the way ausd asks (libsss_nss_idmap)
        import pysss_nss_idmap as idmap
        found = idmap.getsidbyname(list(BIS_GROUPS) + list(GROUPS))
        self.setup["sids_by_name"] = {n: v.get(idmap.SID_KEY) for n, v in found.items()}

        self.peer = self.stack.enter_context(lab.peer([22, 80, 443, 5432]))
        self.pids["peer"] = [self.peer.proc.pid]
        self.cg = self.stack.enter_context(lab.cgroup())
        policy = {
            # OUTER has no direct members; DB-ADMINS is the directory's
            # `dbadm`, named here by its SID only
            "user_groups": [{"name": "DEV"}, {"name": "OPS"}, {"name": "OUTER"},
                            {"name": "DB-ADMINS", "sid": f"{DOMAIN_SID}-{BIS_GROUPS['dbadm'][1]}"}],
            "ip_lists": {"peer": [f"{self.peer.v4}/32", f"{self.peer.v6}/128"]},
            "rules": [
                {"name": "dev-web", "sources": ["DEV"], "destinations": ["peer"], "services": ["80/tcp"]},
                {"name": "ops-ssh", "sources": ["OPS"], "destinations": ["peer"], "services": ["22/tcp"]},
                {"name": "outer-https", "sources": ["OUTER"], "destinations": ["peer"],
                 "services": ["443/tcp"]},
                {"name": "db-by-sid", "sources": ["DB-ADMINS"], "destinations": ["peer"],
                 "services": ["5432/tcp"]},
            ],
        }
        self.d = self.stack.enter_context(
            lab.ausd(self.cg, policy, groups_ttl=GROUPS_TTL, scan_interval=SCAN_INTERVAL))
        self.stack.callback(self.dump_ausd_log)   # runs before lab.ausd removes its workdir
        # The shipped hook, pointed at this test's ausd by its arguments
        # (it takes nothing from the environment).
        hook.write_text("#!/bin/sh\n"
                        f"exec {SHIPPED_HOOK} -- {PYTHON} -m aus.cli.ausctl --config {self.d.config_path}\n")
        hook.chmod(0o755)
        ta = time.monotonic()
        self.d.start()
        self.pids["ausd"] = [self.d.proc.pid]
        self.setup["ausd_start_s"] = round(time.monotonic() - ta, 3)
        self.setup["build_s"] = round(time.monotonic() - t, 3)
        self.setup["peer"] = {"v4": self.peer.v4, "v6": self.peer.v6, "host_v4": self.peer.host_v4}
        # what the test checks is gone afterwards
        self.setup["made"] = {
            "mnt_ns": os.readlink("/proc/self/ns/mnt"),
            "netns": self.peer.ns,
            "netns_id": f"net:[{os.stat(f'/run/netns/{self.peer.ns}').st_ino}]",
            "cgroup": str(self.cg), "pin_dir": str(self.d.pin_dir),
            "ausd_workdir": str(self.d.workdir),
        }
        log(f"built in {self.setup['build_s']}s: {self.setup}")

    def dump_ausd_log(self) -> None:
        print("----- ausd.log (tail) -----\n" + tail(self.d.workdir / "ausd.log", 80),
              file=sys.stderr, flush=True)

    def dump_logs(self) -> None:
        for name, path in (("pam-hook.log", self.work / "pam-hook.log"),
                           ("sssd.out", self.work / "sssd.out"),
                           ("sssd.log", Path("/var/log/sssd/sssd.log")),
                           ("sssd_corp.log", Path("/var/log/sssd/sssd_corp.log")),
                           ("sssd_nest.log", Path("/var/log/sssd/sssd_nest.log")),
                           ("sssd_nss.log", Path("/var/log/sssd/sssd_nss.log")),
                           ("sssd_pam.log", Path("/var/log/sssd/sssd_pam.log"))):
            print(f"----- {name} (tail) -----\n{tail(path, 40)}", file=sys.stderr, flush=True)

    def cleanup_processes(self) -> None:
        for p in self.shells.values():
            if p.poll() is None:
                p.kill()
            p.wait()

    # -- helpers --------------------------------------------------------------------
    def act(self, user: str, port: int, *, v6: bool = False, as_root: bool = False) -> dict:
        uid, gid, _ = ACCOUNTS[user]
        addr = self.peer.v6 if v6 else self.peer.v4
        if as_root:
            return lab.act(self.cg, "tcp", addr, port, loginuid=uid)
        return lab.act(self.cg, "tcp", addr, port, loginuid=uid, uid=uid, gid=gid)

    def hook_log(self) -> list[str]:
        try:
            return (self.work / "pam-hook.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def pamtester(self, user: str, *ops: str, password: str | None = None,
                  loginuid: int | None = None) -> dict:
        """pamtester SERVICE USER OPS...; with ``loginuid`` it runs in a
        process that already carries that login UID (the login process
        that opened the session, as at a real logout)."""
        before = len(self.hook_log())
        t = time.monotonic()
        p = lab.spawn(["pamtester", "-v", SERVICE, user, *ops], loginuid=loginuid,
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate("" if password is None else password + "\n", timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        took = time.monotonic() - t
        res = {"cmd": ["pamtester", "-v", SERVICE, user, *ops], "rc": p.returncode,
               "seconds": round(took, 3), "stdout": out.strip(), "stderr": err.strip(),
               "hook_log": self.hook_log()[before:]}
        log(f"pamtester {user} {' '.join(ops)} -> {p.returncode} in {took:.2f}s; hook: {res['hook_log']}")
        return res

    def start_shell(self, user: str) -> int:
        """The login's shell: a process carrying the user's login UID."""
        uid, gid, _ = ACCOUNTS[user]
        p = lab.spawn(["sleep", "600"], loginuid=uid, uid=uid, gid=gid)
        self.shells[user] = p
        self.pids["shells"].append(p.pid)
        return p.pid

    def stop_shell(self, user: str) -> None:
        p = self.shells.pop(user)
        p.kill()
        p.wait()

    def users_entry(self, uid: int) -> dict | None:
        for u in self.d.ctl_json("users")["users"]:
            if u["login_uid"] == uid:
                return u
        return None

    def map_uids(self) -> list[int]:
        return [u["login_uid"] for u in self.d.ctl_json("maps")["users"]]

    def login(self, user: str) -> dict:
        uid = ACCOUNTS[user][0]
        obs: dict = {"pam": self.pamtester(user, "authenticate", "open_session",
                                           password=self.passwords[user])}
        obs["shell_pid"] = self.start_shell(user)
        t = time.monotonic()
        entry = None
        while time.monotonic() - t < 2.0:
            entry = self.users_entry(uid)
            if entry and entry.get("user") == user:
                break
            time.sleep(0.05)
        obs["listed_after_s"] = round(time.monotonic() - t, 3)
        obs["users_entry"] = entry
        return obs

    # -- the cases ----------------------------------------------------------------------
    def case_login(self) -> dict:
        # pam_sss really checks the LDAP password: a wrong one opens nothing
        bad = self.pamtester("alice", "authenticate", "open_session", password="not-her-password")
        in_maps = 41001 in self.map_uids()
        obs = self.login("alice")
        obs["wrong_password"] = {**bad, "in_maps_after": in_maps}
        obs["tcp80_v4"] = self.act("alice", 80)
        obs["tcp80_v6"] = self.act("alice", 80, v6=True)
        obs["tcp22_v4"] = self.act("alice", 22)
        obs["sudo_tcp22_v4"] = self.act("alice", 22, as_root=True)
        obs["sudo_tcp80_v4"] = self.act("alice", 80, as_root=True)
        return obs

    def case_two_users(self) -> dict:
        obs = self.login("bob")
        jobs = {"alice_80": ("alice", 80), "alice_22": ("alice", 22),
                "bob_22": ("bob", 22), "bob_80": ("bob", 80)}
        with ThreadPoolExecutor(max_workers=4) as ex:
            futs = {k: ex.submit(self.act, u, p) for k, (u, p) in jobs.items()}
            obs["traffic"] = {k: f.result() for k, f in futs.items()}
        obs["both_listed"] = sorted(u for u in (41001, 41002) if self.users_entry(u))
        return obs

    def case_group_change(self) -> dict:
        obs: dict = {"before": {"tcp80": self.act("alice", 80), "tcp22": self.act("alice", 22)}}
        t = time.monotonic()
        m = self.slapd.modify(
            f"dn: cn=dev,ou=groups,{SUFFIX}\nchangetype: modify\ndelete: memberUid\nmemberUid: alice\n\n"
            f"dn: cn=ops,ou=groups,{SUFFIX}\nchangetype: modify\nadd: memberUid\nmemberUid: alice\n")
        obs["ldapmodify"] = {"rc": m.returncode, "stderr": m.stderr.strip()}
        c = sh("sss_cache", "-E", check=False)
        obs["sss_cache"] = {"rc": c.returncode, "stderr": c.stderr.strip()}
        t_flush = time.monotonic()
        obs["ldap_after"] = self.slapd.search("(memberUid=alice)").stdout.strip().splitlines()
        flipped, tries, last = False, 0, None
        while time.monotonic() - t < 15.0:
            tries += 1
            last = {"tcp22": self.act("alice", 22), "tcp80": self.act("alice", 80)}
            if last["tcp22"]["ok"] and last["tcp80"]["errno"] == "EPERM":
                flipped = True
                break
            time.sleep(0.1)
        now = time.monotonic()
        obs.update(flipped=flipped, probes=tries, last=last,
                   seconds_since_ldapmodify=round(now - t, 3),
                   seconds_since_sss_cache=round(now - t_flush, 3))
        obs["id_alice"] = sh("id", "alice", check=False).stdout.strip()
        obs["users_entry"] = self.users_entry(41001)
        obs["shell_alive"] = self.shells["alice"].poll() is None   # no new login
        obs["bob_unchanged"] = {"tcp22": self.act("bob", 22), "tcp80": self.act("bob", 80)}
        log(f"group change flipped={flipped} after {obs['seconds_since_ldapmodify']}s")
        return obs

    def traffic(self, probes: dict[str, tuple]) -> dict:
        """{key: act(user, port[, v6])} run side by side."""
        with ThreadPoolExecutor(max_workers=len(probes)) as ex:
            futs = {k: ex.submit(self.act, user, port, v6=bool(v6))
                    for k, (user, port, *v6) in probes.items()}
            return {k: f.result() for k, f in futs.items()}

    def case_nested_group(self) -> dict:
        carol, dave = BIS_USERS["carol"][0], BIS_USERS["dave"][0]
        obs: dict = {"carol": self.login("carol"), "dave": self.login("dave")}
        # What the directory says: carol's own groups, and outer's members
        # (a group, no user)
        obs["ldap_carol_groups"] = self.slapd_bis.values(f"(member={bis_dn('carol')})", "cn")
        obs["ldap_outer_members"] = self.slapd_bis.values("(cn=outer)", "member")
        obs["id_carol"] = sh("id", "carol", check=False).stdout.strip()
        obs["traffic"] = self.traffic({
            "carol_443_v4": ("carol", 443), "carol_443_v6": ("carol", 443, True),
            "carol_22": ("carol", 22), "carol_80": ("carol", 80), "dave_443": ("dave", 443)})
        obs["carol_entry"] = self.users_entry(carol)
        obs["dave_entry"] = self.users_entry(dave)
        table = self.d.ctl("users").stdout.splitlines()
        obs["ausctl_users"] = {"header": table[0] if table else "",
                               "carol": [l for l in table if " carol " in l]}
        return obs

    def case_sid_group(self) -> dict:
        carol, dave = BIS_USERS["carol"][0], BIS_USERS["dave"][0]
        obs: dict = {"traffic": self.traffic({
            "carol_5432_v4": ("carol", 5432), "carol_5432_v6": ("carol", 5432, True),
            "dave_5432": ("dave", 5432), "dave_443": ("dave", 443), "dave_22": ("dave", 22)})}
        obs["carol_entry"] = self.users_entry(carol)
        obs["dave_entry"] = self.users_entry(dave)
        obs["check_carol"] = self.d.check(carol, self.peer.v4, "tcp", 5432)
        obs["check_dave"] = self.d.check(dave, self.peer.v4, "tcp", 5432)
        return obs

    def case_nested_change(self) -> dict:
        """In LDAP, outer's member group becomes support instead of inner:
        outer's rule moves from carol to dave, neither logging in again;
        carol's dbadm rule (by SID) stays."""
        carol, dave = BIS_USERS["carol"][0], BIS_USERS["dave"][0]
        t = time.monotonic()
        m = self.slapd_bis.modify(f"dn: {bis_dn('outer')}\nchangetype: modify\n"
                                  f"replace: member\nmember: {bis_dn('support')}\n")
        obs: dict = {"ldapmodify": {"rc": m.returncode, "stderr": m.stderr.strip()}}
        c = sh("sss_cache", "-E", check=False)
        obs["sss_cache"] = {"rc": c.returncode, "stderr": c.stderr.strip()}
        flipped, last = False, None
        while time.monotonic() - t < 15.0:
            last = self.traffic({"carol_443": ("carol", 443), "carol_5432": ("carol", 5432),
                                 "dave_443": ("dave", 443)})
            if last["carol_443"]["errno"] == "EPERM" and last["dave_443"]["ok"]:
                flipped = True
                break
            time.sleep(0.1)
        obs.update(flipped=flipped, last=last, seconds=round(time.monotonic() - t, 3))
        obs["id"] = {u: sh("id", u, check=False).stdout.strip() for u in ("carol", "dave")}
        obs["carol_entry"] = self.users_entry(carol)
        obs["dave_entry"] = self.users_entry(dave)
        obs["shells_alive"] = all(self.shells[u].poll() is None for u in ("carol", "dave"))
        log(f"nested change flipped={flipped} after {obs['seconds']}s")
        return obs

    def case_logout(self) -> dict:
        obs: dict = {"in_maps_before": 41001 in self.map_uids()}
        # pam_loginuid does nothing at close_session, so the hook's login UID
        # is that of the process calling pam_close_session. From a process
        # without one, ausd cannot tell whose session closes (recorded; the
        # hook must still exit 0):
        obs["pam_no_loginuid"] = self.pamtester("alice", "close_session")
        # A real login closes the session from the process that opened it,
        # which carries her login UID:
        obs["pam"] = self.pamtester("alice", "close_session", loginuid=41001)
        self.stop_shell("alice")
        t = time.monotonic()
        gone = False
        while time.monotonic() - t < 10.0:
            if 41001 not in self.map_uids():
                gone = True
                break
            time.sleep(0.05)
        obs["gone_from_maps"] = gone
        obs["gone_after_s"] = round(time.monotonic() - t, 3)
        obs["users_listed"] = [u["login_uid"] for u in self.d.ctl_json("users")["users"]]
        obs["check_after"] = self.d.check(41001, self.peer.v4, "tcp", 80)
        # A leftover process with her login UID, no session.
        obs["leftover_tcp80"] = self.act("alice", 80)
        obs["bob_still_22"] = self.act("bob", 22)
        return obs

    def case_sssd_stopped(self) -> dict:
        """sssd stops (its fast cache still valid): NSS finds bob but glibc
        gives him his primary group only. ausd must keep his groups for
        many groups_ttl; once sssd is back, a real removal in LDAP (dave
        out of support) must still reach the kernel."""
        bob, dave = 41002, BIS_USERS["dave"][0]
        obs: dict = {"before": self.traffic({"bob_22": ("bob", 22), "dave_443": ("dave", 443)})}
        obs["sssd_exit"] = self.sssd.stop()
        obs["getent_bob_stopped"] = sh("getent", "passwd", "bob", check=False).returncode
        obs["id_bob_stopped"] = sh("id", "bob", check=False).stdout.strip()
        # what SSSD's NSS module itself says, asked the way ausd asks
        obs["sss_module_stopped"] = sh(
            PYTHON, "-c", "from aus.agent import nss_sss; s = nss_sss.load(); "
            "u = s.user(41002); print(u, u.value and u.value[0], s.groups('bob', 41002))",
            check=False, env=dict(os.environ, PYTHONPATH=f"{REPO / 'daemon'}:{REPO}")).stdout.strip()
        t = time.monotonic()
        results, sources = [], set()
        while time.monotonic() - t < GROUPS_TTL * 6:
            results.append(self.act("bob", 22))
            entry = self.users_entry(bob)
            sources.add(entry["groups_source"] if entry else None)
            time.sleep(0.1)
        obs["watched_s"] = round(time.monotonic() - t, 3)
        obs["required_s"] = GROUPS_TTL * 5
        obs["probes"] = len(results)
        obs["probes_ok"] = sum(1 for r in results if r["ok"])
        obs["failures"] = [r for r in results if not r["ok"]][:5]
        obs["groups_sources_seen"] = sorted(map(str, sources))
        obs["bob_tcp80"] = self.act("bob", 80)
        obs["bob_entry_stopped"] = self.users_entry(bob)
        table = self.d.ctl("users").stdout.splitlines()
        obs["ausctl_users_bob"] = [l for l in table if " bob " in l]
        obs["sssd_restart_s"] = round(self.sssd.start(), 3)
        lab.wait_until(lambda: (self.users_entry(bob) or {}).get("groups_source") == "nss",
                       timeout=10, what="bob's groups fresh again")
        obs["bob_entry_back"] = self.users_entry(bob)
        # groupOfNames needs a member: the placeholder is no entry at all
        t = time.monotonic()
        m = self.slapd_bis.modify(f"dn: {bis_dn('support')}\nchangetype: modify\n"
                                  f"replace: member\nmember: cn=nobody,{BIS_SUFFIX}\n")
        obs["ldapmodify"] = {"rc": m.returncode, "stderr": m.stderr.strip()}
        c = sh("sss_cache", "-E", check=False)
        obs["sss_cache"] = {"rc": c.returncode, "stderr": c.stderr.strip()}
        flipped, last = False, None
        while time.monotonic() - t < 15.0:
            last = self.traffic({"dave_443": ("dave", 443), "bob_22": ("bob", 22)})
            if last["dave_443"]["errno"] == "EPERM":
                flipped = True
                break
            time.sleep(0.1)
        obs.update(removal_flipped=flipped, removal_last=last,
                   removal_s=round(time.monotonic() - t, 3))
        obs["id_dave"] = sh("id", "dave", check=False).stdout.strip()
        obs["dave_entry"] = self.users_entry(dave)
        log(f"sssd stopped: {obs['probes_ok']}/{obs['probes']} probes ok, sources "
            f"{obs['groups_sources_seen']}; removal flipped={flipped} after {obs['removal_s']}s")
        return obs

    def case_sssd_down(self) -> dict:
        obs: dict = {"bob_entry_before": self.users_entry(41002)}
        obs["sssd_exit"] = self.sssd.stop()
        # libnss_sss answers from its memory-mapped fast cache (/var/lib/sss/mc)
        # while that is valid, sssd running or not: invalidate it, so that
        # every NSS lookup from now on really fails, as in a long outage.
        obs["getent_bob_from_fast_cache"] = sh("getent", "passwd", "bob", check=False).returncode
        c = sh("sss_cache", "-E", check=False)
        obs["sss_cache"] = {"rc": c.returncode, "stderr": c.stderr.strip()}
        obs["getent_bob_after_flush"] = sh("getent", "passwd", "bob", check=False).returncode
        obs["id_bob_after_flush"] = sh("id", "bob", check=False).returncode
        # Watch bob's traffic until it has kept working for groups_ttl * 3
        # seconds after ausd's first failed refresh (seen as a stale source).
        t = time.monotonic()
        results, stale_at, sources = [], None, set()
        while time.monotonic() - t < 20.0:
            results.append(self.act("bob", 22))
            entry = self.users_entry(41002)
            if entry:
                sources.add(entry["groups_source"])
                if stale_at is None and "STALE" in entry["groups_source"]:
                    stale_at = time.monotonic()
            if stale_at is not None and time.monotonic() - stale_at >= GROUPS_TTL * 3 + 0.5:
                break
            time.sleep(0.1)
        obs["stale_seen_after_s"] = round(stale_at - t, 3) if stale_at else None
        obs["ok_while_stale_s"] = round(time.monotonic() - stale_at, 3) if stale_at else 0.0
        obs["watched_s"] = round(time.monotonic() - t, 3)
        obs["required_s"] = GROUPS_TTL * 3
        obs["probes"] = len(results)
        obs["probes_ok"] = sum(1 for r in results if r["ok"])
        obs["failures"] = [r for r in results if not r["ok"]][:5]
        obs["groups_sources_seen"] = sorted(sources)
        obs["bob_tcp80"] = self.act("bob", 80)
        obs["bob_entry_after"] = self.users_entry(41002)
        # The next case logs alice in again, which needs NSS.
        obs["sssd_restart_s"] = round(self.sssd.start(), 3)
        return obs

    def case_ausd_down(self) -> dict:
        obs: dict = {}
        # The leftover of the logout case may have been picked up by the
        # scan; wait until no entry of hers is in the maps.
        lab.wait_until(lambda: 41001 not in self.map_uids(), timeout=10, what="alice out of the maps")
        obs["ausd_exit"] = self.d.stop()
        obs["pam"] = self.pamtester("alice", "open_session")
        shell = self.start_shell("alice")
        obs["shell_pid"] = shell
        obs["maps_users"] = self.map_uids()                 # read from the pins
        obs["tcp80"] = self.act("alice", 80)
        obs["tcp22"] = self.act("alice", 22)                # ops would allow it, were she known
        obs["check_22"] = self.d.check(41001, self.peer.v4, "tcp", 22)
        obs["bob_tcp22"] = self.act("bob", 22)               # pinned maps keep bob's rules
        obs["bob_tcp80"] = self.act("bob", 80)
        return obs


CASES = ["login", "two_users", "nested_group", "sid_group", "nested_change", "group_change",
         "logout", "sssd_stopped", "sssd_down", "ausd_down"]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    sigterm.unwind_on_sigterm(_terminated)
    work = Path(sys.argv[1]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"cases": {}}
    t = time.monotonic()
    sc = None
    try:
        with contextlib.ExitStack() as stack:
            sc = Scenario(work, stack)
            stack.callback(sc.cleanup_processes)
            stack.callback(sc.dump_logs)
            try:
                sc.build()
            except Exception:  # noqa: BLE001 - reported in the JSON
                result["setup_error"] = traceback.format_exc()
                log(result["setup_error"])
            result["setup"] = sc.setup
            if "setup_error" not in result:
                for name in CASES:
                    log(f"case {name}")
                    tc = time.monotonic()
                    try:
                        obs = getattr(sc, f"case_{name}")()
                    except Exception:  # noqa: BLE001 - reported in the JSON
                        obs = {"error": traceback.format_exc()}
                        log(obs["error"])
                    obs["case_s"] = round(time.monotonic() - tc, 3)
                    result["cases"][name] = obs
            log("cleaning up")
    except Terminated:
        result["terminated"] = "SIGTERM; cleaned up"
        log(result["terminated"])
    result["pids"] = sc.pids if sc else {}
    result["total_s"] = round(time.monotonic() - t, 3)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
