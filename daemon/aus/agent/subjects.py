"""Who ``explain`` is about: a user named on the command line, resolved as
ausd resolves a login UID (NSS, with SSSD's own answer; the policy
server's memberships), or groups given as they are.

A user with a session ausd manages is taken as ausd holds it (the groups
its rules in the kernel were computed from); anyone else is looked up
now, once, without entering ausd's directory cache.
"""

from __future__ import annotations

import pwd
import time
from collections.abc import Callable, Mapping

from ..core.bundle import Bundle
from ..core.errors import AusError
from ..core.explain import Subject
from .identity import Answer, judge, nss_lookup
from .report import Identity


def of_groups(text: str) -> Subject:
    """``G1,G2``: those groups, nothing looked up."""
    groups = tuple(dict.fromkeys(g.strip() for g in text.split(",") if g.strip()))
    return Subject(None, None, groups)


def login_uid_of(user: str) -> int | None:
    """The UID of a user name (or of a number given as one); None when
    NSS does not know the name. Raises AusError for an empty name."""
    if not user.strip():
        raise AusError("--user: an empty user name")
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        if user.isdigit():
            return int(user)
        return None


def of_user(user: str, *, bundle: Bundle | None = None, match: str = "exact",
            identities: Mapping[int, Identity] | None = None,
            lookup: Callable[[int], tuple] = nss_lookup) -> Subject:
    """The user's groups as ausd would take them at a login now (or holds
    them, for a live session), plus the bundle's memberships."""
    uid = login_uid_of(user)
    if uid is None:
        raise AusError(f"--user {user}: no such user (NSS does not know the name)")
    live = identities.get(uid) if identities is not None else None
    if live is not None:
        info, extra = live.info, live.bundle_groups
    else:
        try:
            answer = Answer(*lookup(uid))
        except OSError as exc:
            answer = Answer(None, status="unavailable", detail=str(exc))
        info = judge(uid, None, answer, time.time())
        extra = bundle.groups_of(info.name, match) if bundle is not None else ()
    return Subject(info.name, uid, info.groups, info.sids, tuple(extra),
                   known=info.name is not None, logged_in=live is not None, stale=info.stale)
