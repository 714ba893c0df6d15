"""Who a login UID is and which directory groups it belongs to, via NSS.

NSS is how SSSD serves Active Directory, LDAP and FreeIPA users and
groups, so ``getpwuid`` + ``getgrouplist`` see directory groups (nested
ones too, when SSSD resolves them). Answers are cached per login UID for
``ttl`` seconds; when a lookup fails after a user was known, the last
known groups stay (a directory outage must not change enforcement), and
an unknown user gets no groups, hence only the baseline.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserInfo:
    login_uid: int
    name: str | None          # None: NSS does not know this UID
    groups: tuple[str, ...]
    source: str               # "nss", "nss (stale: <reason>)", "unknown"
    fetched_at: float         # time.time() of the answer
    sids: tuple[str, ...] = ()  # the groups' SIDs, where SSSD knows them (AD)


_GID_NAMES: dict[int, str | None] = {}
_GID_NAMES_AT = [0.0]
GID_NAME_TTL = 60.0


def _group_name(gid: int) -> str | None:
    """A GID's name, cached for a minute: getgrgid() also builds the
    group's member list, which for a large group costs more than the whole
    rest of a lookup."""
    now = time.monotonic()
    if now - _GID_NAMES_AT[0] > GID_NAME_TTL:
        _GID_NAMES.clear()
        _GID_NAMES_AT[0] = now
    if gid not in _GID_NAMES:
        try:
            _GID_NAMES[gid] = grp.getgrgid(gid).gr_name
        except KeyError:
            _GID_NAMES[gid] = None  # a GID without a name matches no policy group
    return _GID_NAMES[gid]


try:  # Debian's python3-libsss-nss-idmap: SIDs of AD groups served by SSSD
    import pysss_nss_idmap as _idmap
except ImportError:  # pragma: no cover - depends on the host
    _idmap = None


def _group_sids(gids: list[int]) -> tuple[str, ...]:
    if _idmap is None or not gids:
        return ()
    try:
        found = _idmap.getsidbygid(gids)
    except (OSError, SystemError, ValueError):
        return ()  # SSSD down or not an SSSD group: names still match
    return tuple(v[_idmap.SID_KEY].upper() for v in found.values() if _idmap.SID_KEY in v)


def nss_lookup(login_uid: int) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """(user name, group names, group SIDs) from NSS; (None, (), ()) for an
    unknown UID. Nested groups are in the list when SSSD resolves them."""
    try:
        pw = pwd.getpwuid(login_uid)
    except KeyError:
        return None, (), ()
    gids = os.getgrouplist(pw.pw_name, pw.pw_gid)
    names = [_group_name(gid) for gid in gids]
    return pw.pw_name, tuple(dict.fromkeys(n for n in names if n)), _group_sids(gids)


@dataclass
class Directory:
    """Cached view of NSS. ``lookup`` and ``clock`` are seams for tests."""
    ttl: float = 30.0
    lookup: Callable[[int], tuple[str | None, tuple[str, ...]]] = nss_lookup
    clock: Callable[[], float] = time.time
    # in order of fetch time (a fetch moves a user to the end), so the
    # users due for a refresh are found at the front without a full pass
    _cache: "OrderedDict[int, UserInfo]" = field(default_factory=OrderedDict)

    def get(self, login_uid: int, *, refresh: bool = False) -> UserInfo:
        now = self.clock()
        cached = self._cache.get(login_uid)
        if cached and not refresh and now - cached.fetched_at < self.ttl:
            return cached
        try:
            name, groups, *more = self.lookup(login_uid)
            sids = tuple(more[0]) if more else ()
        except OSError as exc:
            if cached and cached.name:
                log.warning("groups of login UID %d: %s; keeping the last known",
                            login_uid, exc)
                info = UserInfo(login_uid, cached.name, cached.groups,
                                f"nss (stale: {exc})", cached.fetched_at, cached.sids)
                self._cache[login_uid] = info
                return info
            name, groups, sids = None, (), ()
        if name is None and cached and cached.name:
            # NSS forgot a known user (directory unreachable): keep groups.
            info = UserInfo(login_uid, cached.name, cached.groups,
                            "nss (stale: user not found)", cached.fetched_at, cached.sids)
        else:
            info = UserInfo(login_uid, name, groups,
                            "nss" if name else "unknown", now, sids)
        self._cache[login_uid] = info
        if info.fetched_at == now:
            self._cache.move_to_end(login_uid)
        return info

    def due(self, limit: int) -> list[int]:
        """Up to ``limit`` users whose groups are older than the TTL,
        oldest first."""
        now = self.clock()
        out = []
        for uid, info in self._cache.items():
            if now - info.fetched_at < self.ttl or len(out) >= limit:
                break
            out.append(uid)
        return out

    def forget(self, login_uid: int) -> None:
        self._cache.pop(login_uid, None)

    def expired(self, login_uid: int) -> bool:
        cached = self._cache.get(login_uid)
        return cached is None or self.clock() - cached.fetched_at >= self.ttl
