"""Who a login UID is and which directory groups it belongs to, via NSS.

NSS is how SSSD serves Active Directory, LDAP and FreeIPA users and
groups, so ``getpwuid`` + ``getgrouplist`` see directory groups (nested
ones too, when SSSD resolves them). Answers are cached per login UID for
``ttl`` seconds.

A directory outage must not change enforcement, and glibc cannot tell an
outage from an answer: with SSSD down, ``getgrouplist()`` quietly returns
the primary group only. So for users SSSD serves, the groups are asked of
SSSD's NSS module directly (:mod:`.nss_sss`), which says when it cannot
answer; :func:`judge` then keeps the last known groups, marked stale,
until SSSD answers again. Users from local files take glibc's answer as it
is. An unknown user gets no groups, hence only the baseline.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

from . import groupfile, nss_sss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserInfo:
    login_uid: int
    name: str | None          # None: NSS does not know this UID
    groups: tuple[str, ...]
    source: str               # "nss" or "unknown"
    fetched_at: float         # time.time() of the answer the groups come from
    sids: tuple[str, ...] = ()  # the groups' SIDs, where SSSD knows them (AD)
    stale: str = ""           # why the last known groups were kept ("": fresh)
    partial: bool = False     # groups of an incomplete answer, none known before
    checked_at: float | None = None   # the last lookup, if later than fetched_at

    @property
    def last_check(self) -> float:
        return self.fetched_at if self.checked_at is None else self.checked_at


# How complete an NSS answer is.
COMPLETE = "complete"         # the directory answered (or the user is local)
UNAVAILABLE = "unavailable"   # the directory could not answer
PARTIAL = "partial"           # it answered, but not all of it resolved


class Answer(NamedTuple):
    name: str | None
    groups: tuple[str, ...] = ()
    sids: tuple[str, ...] = ()
    status: str = COMPLETE
    detail: str = ""          # why not complete


def judge(login_uid: int, cached: UserInfo | None, answer: Answer, now: float) -> UserInfo:
    """What ausd takes as a user's groups, from the last known ones and a
    new answer. A complete answer replaces them, shorter or not: a real
    removal must reach the kernel. An unavailable or partial answer, or a
    known user NSS no longer finds, keeps the last groups, marked stale;
    a user never known gets what there is, marked partial (fail closed)."""
    known = cached is not None and cached.name is not None
    if answer.status == COMPLETE:
        if answer.name is not None:
            return UserInfo(login_uid, answer.name, tuple(answer.groups), "nss", now,
                            tuple(answer.sids))
        if known:
            return _keep(cached, "user not found", now)
        return UserInfo(login_uid, None, (), "unknown", now)
    if known and answer.name in (None, cached.name):
        return _keep(cached, answer.detail or answer.status, now)
    if answer.name is None:
        return UserInfo(login_uid, None, (), "unknown", now)
    return UserInfo(login_uid, answer.name, tuple(answer.groups), "nss", now,
                    tuple(answer.sids), stale=answer.detail or answer.status, partial=True)


def _keep(cached: UserInfo, why: str, now: float) -> UserInfo:
    return replace(cached, stale=why, checked_at=now)


_GID_NAMES: dict[int, str | None] = {}
_GID_NAMES_AT = [0.0]
GID_NAME_TTL = 60.0


def _group_name(gid: int, sss: nss_sss.SssNss | None = None) -> tuple[str | None, str]:
    """(A GID's name, "" or why it could not be resolved), cached for a
    minute: getgrgid() also builds the group's member list, which for a
    large group costs more than the whole rest of a lookup. A GID without
    a name matches no policy group; one SSSD could not resolve is not
    cached."""
    now = time.monotonic()
    if now - _GID_NAMES_AT[0] > GID_NAME_TTL:
        _GID_NAMES.clear()
        _GID_NAMES_AT[0] = now
    if gid in _GID_NAMES:
        return _GID_NAMES[gid], ""
    try:
        _GID_NAMES[gid] = grp.getgrgid(gid).gr_name
    except KeyError:
        reply = sss.group_name(gid) if sss is not None else None
        if reply is not None and reply.unavailable:
            return None, f"group {gid} not resolvable (SSSD {reply})"
        _GID_NAMES[gid] = None
    return _GID_NAMES[gid], ""


try:  # Debian's python3-libsss-nss-idmap: SIDs of AD groups served by SSSD
    import pysss_nss_idmap as _idmap
except ImportError:  # pragma: no cover - depends on the host
    _idmap = None


_GID_SIDS: dict[int, str | None] = {}
_GID_SIDS_AT = [0.0]


def _group_sids(gids: list[int]) -> tuple[str, ...]:
    """The groups' SIDs, cached per GID for a minute like their names:
    every user of a group asks for the same SID, and SSSD takes
    milliseconds to say a group has none. An answer SSSD could not give
    is not cached."""
    if _idmap is None or not gids:
        return ()
    now = time.monotonic()
    if now - _GID_SIDS_AT[0] > GID_NAME_TTL:
        _GID_SIDS.clear()
        _GID_SIDS_AT[0] = now
    ask = [g for g in gids if g not in _GID_SIDS]
    if ask:
        try:
            found = _idmap.getsidbygid(ask)
        except (OSError, SystemError, ValueError):
            found = None  # SSSD down or not an SSSD group: names still match
        if found is not None:
            for gid in ask:
                v = found.get(gid) or found.get(str(gid)) or {}
                _GID_SIDS[gid] = v[_idmap.SID_KEY].upper() if _idmap.SID_KEY in v else None
    return tuple(s for s in (_GID_SIDS.get(g) for g in gids) if s)


_SSS = nss_sss.load()
_FILES = groupfile.FilesOnly()


def files_only() -> bool:
    """Whether NSS reads users and groups from local files alone (then a
    lookup is in-process work: more threads would only share the GIL)."""
    return _FILES.files_only()


def nss_lookup(login_uid: int) -> Answer:
    """A UID's name, group names and group SIDs from NSS, and whether the
    directory answered in full. Nested groups are in the list when SSSD
    resolves them."""
    table = _FILES.table()
    if table is not None:
        # users and groups from local files only: one parse of the files
        # serves every user, where glibc would read them whole for each
        user = table.users.get(login_uid)
        return Answer(None) if user is None else Answer(user[0], table.groups_of(*user))
    try:
        pw = pwd.getpwuid(login_uid)
    except KeyError:
        return Answer(None)
    served = _SSS.user(login_uid) if _SSS is not None else None
    if served is None or not served.ok or served.value[0] != pw.pw_name:
        # not SSSD's user (local files, or no SSSD): glibc's answer as it is
        gids = os.getgrouplist(pw.pw_name, pw.pw_gid)
        names = [_group_name(gid)[0] for gid in gids]
        return Answer(pw.pw_name, tuple(dict.fromkeys(n for n in names if n)),
                      _group_sids([g for g, n in zip(gids, names) if n]))
    reply = _SSS.groups(pw.pw_name, pw.pw_gid)
    # glibc's list adds what other modules (files) give; SSSD's status
    # says whether its part is whole
    gids = list(dict.fromkeys([pw.pw_gid, *(reply.value or ()),
                               *os.getgrouplist(pw.pw_name, pw.pw_gid)]))
    resolved = [_group_name(gid, _SSS) for gid in gids]
    names = tuple(dict.fromkeys(n for n, _ in resolved if n))
    if reply.unavailable:
        return Answer(pw.pw_name, names, (), UNAVAILABLE, f"SSSD initgroups {reply}")
    missing = [why for _, why in resolved if why]
    if missing:
        return Answer(pw.pw_name, names, (), PARTIAL, "; ".join(missing))
    # a GID NSS cannot name (a user private GID with no group) has no SID
    # either; asking SSSD costs milliseconds each
    return Answer(pw.pw_name, names, _group_sids([g for g, (n, _) in zip(gids, resolved) if n]))


@dataclass
class Directory:
    """Cached view of NSS. ``lookup`` and ``clock`` are seams for tests;
    ``lookup`` returns an :class:`Answer` or a (name, groups[, sids]) tuple."""
    ttl: float = 30.0
    lookup: Callable[[int], tuple] = nss_lookup
    clock: Callable[[], float] = time.time
    # in order of lookup time (a lookup moves a user to the end), so the
    # users due for a refresh are found at the front without a full pass
    _cache: "OrderedDict[int, UserInfo]" = field(default_factory=OrderedDict)

    def get(self, login_uid: int, *, refresh: bool = False) -> UserInfo:
        cached = self._cache.get(login_uid)
        if cached and not refresh and self.clock() - cached.last_check < self.ttl:
            return cached
        return self.take(login_uid, self.ask(login_uid))

    def ask(self, login_uid: int) -> Answer:
        """The directory's answer, nothing cached: safe from any thread
        (the lookup pool calls it; :meth:`take` then runs in the loop)."""
        try:
            return Answer(*self.lookup(login_uid))
        except OSError as exc:
            return Answer(None, status=UNAVAILABLE, detail=str(exc))

    def take(self, login_uid: int, answer: Answer) -> UserInfo:
        """Judge an answer against the last known groups and cache it."""
        now = self.clock()
        cached = self._cache.get(login_uid)
        info = judge(login_uid, cached, answer, now)
        if info.stale and not (cached and cached.stale == info.stale):
            log.warning("groups of login UID %d (%s): %s; %s", login_uid, info.name,
                        info.stale, "keeping the last known" if not info.partial
                        else "taking the partial answer (no groups known before)")
        self._cache[login_uid] = info
        self._cache.move_to_end(login_uid)
        return info

    def cached(self, login_uid: int) -> UserInfo | None:
        """The last judged answer, however old (None: never looked up)."""
        return self._cache.get(login_uid)

    def due(self, limit: int) -> list[int]:
        """Up to ``limit`` users not looked up for the TTL, oldest first."""
        now = self.clock()
        out = []
        for uid, info in self._cache.items():
            if now - info.last_check < self.ttl or len(out) >= limit:
                break
            out.append(uid)
        return out

    def forget(self, login_uid: int) -> None:
        self._cache.pop(login_uid, None)

    def expired(self, login_uid: int) -> bool:
        cached = self._cache.get(login_uid)
        return cached is None or self.clock() - cached.last_check >= self.ttl
