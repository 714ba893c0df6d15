"""Write-time checks: what the bundle build would refuse is refused when
it is written, so that no accepted write can stop an org's bundle.

The bundle's policy is validated as ``ausd`` validates it
(:func:`aus.core.bundle.document_from_data`); of its rules, the ones that
depend on more than the row being written are checked here:

- rule names are unique case-insensitively (``WEB`` beside ``web``): 409;
- user groups' external ids and SIDs are unique (an ``externalId`` pushed
  twice over SCIM, a manual group given a SID the directory already
  pushed): 409;
- IP list names must not read as an address or a service literal (an IP
  list named ``tcp``): 422.

Each check is one probe of an index on a normalized key column
(``rules.name_key``, ``groups.external_id_key``, ``groups.sid``), never a
build of the bundle. The uniqueness checks run at the end of the writing
transaction, after ``bundle.touch`` has taken the org row's lock (the last
lock of every write), so two concurrent writes of clashing names are
serialized and the second one sees the first. A refusal raises
:class:`WriteRefused`; the caller's transaction is rolled back with it.

A check runs only when the value it guards changes: a group's membership
written beside an older clash (from before these checks) still goes
through, so removals always reach the bundle.
"""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from ..core.errors import AusError
from ..core.policy import (
    external_id_key,
    name_key,
    parse_destination,
    reserved_name_problem,
)
from .db import Group, IpList, Org, Rule


class WriteRefused(AusError):
    """A write the bundle could not carry: ``status`` 409 (it clashes with
    another row) or 422 (the value itself is refused), ``field`` the
    attribute at fault."""

    def __init__(self, status: int, field: str, message: str):
        self.status = status
        self.field = field
        self.message = message
        super().__init__(message)


# Core, built once: every group a directory creates is checked (Entra ID
# sends an externalId with each)
_G = Group.__table__
_OTHER_BY_EXTERNAL_ID = select(_G.c.id, _G.c.display_name).where(
    _G.c.org_id == bindparam("org"), _G.c.external_id_key == bindparam("key"),
    _G.c.id != bindparam("but")).limit(1)
_OTHER_BY_SID = select(_G.c.id, _G.c.display_name).where(
    _G.c.org_id == bindparam("org"), _G.c.sid == bindparam("sid"),
    _G.c.id != bindparam("but")).limit(1)
_LOCK_ORG = select(Org.__table__.c.id).where(Org.__table__.c.id == bindparam("org")) \
    .with_for_update(key_share=True)


def lock_org(s: Session, org_id: str) -> None:
    """Take the org row's lock (a no-op when this transaction holds it,
    and on SQLite, whose writers are serialized already). The lock
    ``bundle.touch``'s UPDATE takes, FOR NO KEY UPDATE: FOR UPDATE would
    also wait for every transaction that inserted a row referencing the
    org (their KEY SHARE locks), and deadlock with them."""
    # key_share without read renders FOR NO KEY UPDATE on PostgreSQL
    s.flush()
    s.connection().execute(_LOCK_ORG, {"org": org_id})


def ip_list_name(name: str) -> None:
    """An IP list's name must not read as an address or a service: a rule
    naming it would be ambiguous, and the bundle is refused."""
    reason = reserved_name_problem(name, "IP list")
    if reason is not None:
        raise WriteRefused(422, "name", reason)


def rule_name(s: Session, org_id: str, rule_id: str, name: str) -> None:
    """No other rule of the org has ``name`` in another case."""
    lock_org(s, org_id)
    other = s.scalar(select(Rule.name).where(Rule.org_id == org_id, Rule.name_key == name_key(name),
                                             Rule.id != rule_id).limit(1))
    if other is not None:
        raise WriteRefused(409, "name", f"a rule named {other!r} exists already "
                                        "(rule names compare case-insensitively)")


def rule_destinations(s: Session, org_id: str, destinations: list[str]) -> None:
    """Each destination that is not an address (or a dns: name) names an
    IP list that still exists (one deleted since the rule was validated
    is not one)."""
    names = [d for d in destinations if not _is_literal(d)]
    if not names:
        return
    lock_org(s, org_id)
    found = set(s.scalars(select(IpList.name).where(IpList.org_id == org_id,
                                                     IpList.name.in_(names))))
    for i, dest in enumerate(destinations):
        if dest in names and dest not in found:
            raise WriteRefused(409, f"destinations[{i}]",
                               f"IP list {dest!r} was deleted while this rule was written")


def _is_literal(text: str) -> bool:
    try:
        parse_destination(text)
    except ValueError:
        return False
    return True


def group_ids(s: Session, org_id: str, group_id: str, *, external_id: str | None = None,
              sid: str | None = None) -> None:
    """No other user group of the org has the same external id (compared
    as the bundle compares them) or SID. Pass only the values that changed."""
    key = external_id_key(external_id) if external_id else ""
    if not key and not sid:
        return
    lock_org(s, org_id)
    conn = s.connection()
    if key:
        other = conn.execute(_OTHER_BY_EXTERNAL_ID, {"org": org_id, "key": key,
                                                     "but": group_id}).first()
        if other is not None:
            raise WriteRefused(409, "externalId", f"externalId {external_id!r} is already "
                                                  f"given to group {other.display_name!r} "
                                                  f"({other.id}); external ids compare "
                                                  "case-insensitively")
    if sid:
        other = conn.execute(_OTHER_BY_SID, {"org": org_id, "sid": sid, "but": group_id}).first()
        if other is not None:
            raise WriteRefused(409, "sid", f"SID {sid} is already given to group "
                                           f"{other.display_name!r} ({other.id})")
