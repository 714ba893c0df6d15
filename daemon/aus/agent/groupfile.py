"""Users and group lists from /etc/passwd and /etc/group in one pass,
where NSS reads nothing else.

``getgrouplist()`` over NSS files reads the whole of /etc/group for every
user (and ``getpwuid()`` the whole of /etc/passwd): with 10,000 users in
one group, looking up 10,000 users parses that group 10,000 times. When
nsswitch.conf names ``files`` alone for passwd and for groups (and for
initgroups, if it has that line), the files are the whole answer, so
each is parsed once (again only when it changes) and every user comes
from the tables. With any other source (sss, systemd, ldap, compat)
glibc's own path is taken.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

NSSWITCH = "/etc/nsswitch.conf"
GROUP = "/etc/group"
PASSWD = "/etc/passwd"


def files_only(text: str) -> bool:
    """Whether this nsswitch.conf resolves users and groups from files and
    nothing else (no action items either: ``[NOTFOUND=return]`` changes
    meaning)."""
    sources: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        db, _, rest = line.partition(":")
        sources[db.strip()] = rest.split()
    group = sources.get("group")
    init = sources.get("initgroups", group)
    return sources.get("passwd") == ["files"] and group == ["files"] and init == ["files"]


@dataclass(frozen=True)
class Table:
    """/etc/group read once: each GID's first name, each user's groups;
    /etc/passwd: each UID's first (name, primary GID)."""
    names: dict[int, str]
    member_of: dict[str, tuple[int, ...]]
    users: dict[int, tuple[str, int]]

    def groups_of(self, user: str, primary_gid: int) -> tuple[str, ...]:
        """What getgrouplist() + getgrgid() give over NSS files: the
        primary group, then every group listing the user, as names."""
        gids = [primary_gid, *self.member_of.get(user, ())]
        return tuple(dict.fromkeys(n for n in (self.names.get(g) for g in gids) if n))


def _records(text: str):
    """The fields of each line of an /etc/passwd or /etc/group text with
    a numeric third field, as (fields, that number); comments, short and
    malformed lines are skipped, as glibc's files backend skips them."""
    for line in text.splitlines():
        if not line or line.lstrip().startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) < 4:
            continue
        try:
            yield parts, int(parts[2])
        except ValueError:
            continue


def parse_passwd(text: str) -> dict[int, tuple[str, int]]:
    users: dict[int, tuple[str, int]] = {}
    for parts, uid in _records(text):
        try:
            gid = int(parts[3])
        except ValueError:
            continue
        users.setdefault(uid, (parts[0], gid))
    return users


def parse(text: str, passwd: str = "") -> Table:
    names: dict[int, str] = {}
    member_of: dict[str, list[int]] = {}
    for parts, gid in _records(text):
        names.setdefault(gid, parts[0])
        for member in parts[3].split(","):
            member = member.strip()
            if member:
                member_of.setdefault(member, []).append(gid)
    return Table(names, {u: tuple(g) for u, g in member_of.items()}, parse_passwd(passwd))


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FilesOnly:
    """The tables of /etc/group and /etc/passwd while nsswitch.conf
    says ``files`` alone,
    else None; both files are read again when they change. Thread-safe:
    the lookup pool's threads share one table."""

    def __init__(self, nsswitch: str = NSSWITCH, group: str = GROUP, passwd: str = PASSWD):
        self.nsswitch, self.group, self.passwd = nsswitch, group, passwd
        self._lock = threading.Lock()
        self._nss_stamp: tuple | None = None
        self._files_only = False
        self._group_stamp: tuple | None = None
        self._table: Table | None = None

    def files_only(self) -> bool:
        """Whether nsswitch.conf says files alone (the files are not read)."""
        with self._lock:
            return self._check_nsswitch()

    def _check_nsswitch(self) -> bool:
        stamp = _stamp(self.nsswitch)
        if stamp != self._nss_stamp:
            try:
                with open(self.nsswitch) as f:
                    self._files_only = files_only(f.read())
            except OSError:
                self._files_only = False   # glibc's defaults: not ours to guess
            self._nss_stamp = stamp
        return self._files_only

    def table(self) -> Table | None:
        with self._lock:
            if not self._check_nsswitch():
                return None
            stamp = (_stamp(self.group), _stamp(self.passwd))
            if None in stamp:
                return None
            if stamp != self._group_stamp or self._table is None:
                try:
                    with open(self.group, encoding="utf-8", errors="replace") as g, \
                            open(self.passwd, encoding="utf-8", errors="replace") as p:
                        self._table = parse(g.read(), p.read())
                except OSError:
                    return None
                self._group_stamp = stamp
            return self._table
