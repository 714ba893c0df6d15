"""SCIM reads and writes on the store, inside the caller's transaction.

Every query is scoped to one org. Groups seen over SCIM are the ones SCIM
created (``source`` "scim"); groups an administrator added by hand stay
out of the directory's reach, though their names still count for
uniqueness.

Member writes are bulk statements: ids are checked with ``IN`` queries in
chunks, added with one ``INSERT ... ON CONFLICT DO NOTHING`` (executed in
multi-row batches) and removed with ``DELETE ... IN``; adding a member
twice, or two requests adding members at once, never fails nor loses one.
On PostgreSQL the group row is locked first (``FOR UPDATE``) and the
member rows are share-locked, so a user deleted at the same moment cannot
leave a membership behind; the org row (``bundle.touch``) is always locked
last.
"""

from __future__ import annotations

import uuid
from typing import Iterable

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..db import Group, Membership, User, fold, utcnow
from .errors import INVALID_VALUE, UNIQUENESS, ScimError, not_found
from .filter import Node
from .patch import MemberOp
from .query import Compiler, member_condition
from .resources import GROUP, USER, Kind, group_columns, user_columns

CHUNK = 900            # ids per IN (...): within every engine's parameter limit


def new_id() -> str:
    return str(uuid.uuid4())


def _dialect(s: Session) -> str:
    return s.get_bind().dialect.name


def _scim_groups(org_id: str):
    return (Group.org_id == org_id, Group.source == "scim")


def _chunks(items: list, n: int = CHUNK) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# --------------------------------------------------------------------------
# Reads


def get_user(s: Session, org_id: str, user_id: str, *, lock: bool = False) -> User:
    q = select(User).where(User.org_id == org_id, User.id == user_id)
    if lock:
        q = q.with_for_update()
    row = s.scalar(q)
    if row is None:
        raise not_found(f"no User with id {user_id!r}")
    return row


def get_group(s: Session, org_id: str, group_id: str, *, lock: bool = False) -> Group:
    q = select(Group).where(*_scim_groups(org_id), Group.id == group_id)
    if lock:
        q = q.with_for_update()
    row = s.scalar(q)
    if row is None:
        raise not_found(f"no Group with id {group_id!r}")
    return row


def search(s: Session, kind: Kind, org_id: str, node: Node | None, start: int,
           count: int) -> tuple[int, list]:
    """``(totalResults, rows)`` for a filter and a 1-based page."""
    model = User if kind is USER else Group
    where = [model.org_id == org_id]
    if kind is GROUP:
        where.append(Group.source == "scim")
    if node is not None:
        where.append(Compiler(kind, _dialect(s)).compile(node))
    key = User.user_name_key if kind is USER else Group.display_name_key
    rows = []
    if count > 0:
        # (org_id, *_key) is the unique index: the page comes in index order
        rows = s.scalars(select(model).where(*where).order_by(key)
                         .offset(start - 1).limit(count)).all()
    if start == 1 and len(rows) < count:
        total = len(rows)               # the common single-match lookup: no COUNT
    else:
        total = s.scalar(select(func.count()).select_from(model).where(*where))
    return total, rows


def members_of(s: Session, group_ids: list[str]) -> dict[str, list[tuple[str, str, str | None]]]:
    """group id -> [(member id, "User"|"Group", display)], one query per chunk."""
    out: dict[str, list] = {g: [] for g in group_ids}
    for part in _chunks(group_ids):
        rows = s.execute(
            select(Membership.group_id, Membership.member_id, Membership.member_type,
                   func.coalesce(User.display_name, User.user_name, Group.display_name))
            .outerjoin(User, (User.id == Membership.member_id) & (Membership.member_type == "User"))
            .outerjoin(Group, (Group.id == Membership.member_id) & (Membership.member_type == "Group"))
            .where(Membership.group_id.in_(part))
            .order_by(Membership.group_id, Membership.member_id)).all()
        for gid, mid, mtype, display in rows:
            out[gid].append((mid, mtype, display))
    return out


def groups_of(s: Session, org_id: str, user_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """user id -> [(group id, display name)] of the groups it is directly in."""
    out: dict[str, list] = {u: [] for u in user_ids}
    for part in _chunks(user_ids):
        rows = s.execute(
            select(Membership.member_id, Group.id, Group.display_name)
            .join(Group, Group.id == Membership.group_id)
            .where(Membership.member_id.in_(part), *_scim_groups(org_id))
            .order_by(Group.display_name_key)).all()
        for uid, gid, name in rows:
            out[uid].append((gid, name))
    return out


# --------------------------------------------------------------------------
# Uniqueness


def _taken_user(s: Session, org_id: str, name: str, but: str | None = None) -> None:
    q = select(User.id).where(User.org_id == org_id, User.user_name_key == fold(name))
    if but:
        q = q.where(User.id != but)
    other = s.scalar(q)
    if other:
        raise ScimError(409, f"userName {name!r} is already taken by User {other} "
                             f"(userName compares case-insensitively)", UNIQUENESS)


def _taken_group(s: Session, org_id: str, name: str, but: str | None = None) -> None:
    q = select(Group.id, Group.source).where(Group.org_id == org_id,
                                              Group.display_name_key == fold(name))
    if but:
        q = q.where(Group.id != but)
    row = s.execute(q).first()
    if row:
        if row.source != "scim":
            raise ScimError(409, f"displayName {name!r} is taken by a group an administrator "
                                 f"added by hand in aus-server; remove or rename that group "
                                 f"there", UNIQUENESS)
        raise ScimError(409, f"displayName {name!r} is already taken by Group {row.id} "
                             f"(displayName compares case-insensitively)", UNIQUENESS)


def integrity_conflict(exc: IntegrityError, kind: Kind) -> ScimError:
    """A unique index the pre-check did not see (a concurrent create)."""
    text = str(exc.orig)
    if "uq_users_org_name" in text or "users.user_name_key" in text:
        return ScimError(409, "userName is already taken (userName compares "
                              "case-insensitively)", UNIQUENESS)
    if "uq_groups_org_name" in text or "groups.display_name_key" in text:
        return ScimError(409, "displayName is already taken (displayName compares "
                              "case-insensitively)", UNIQUENESS)
    return ScimError(409, f"the {kind.name} conflicts with another one", UNIQUENESS)


# --------------------------------------------------------------------------
# Users


def create_user(s: Session, org_id: str, doc: dict) -> User:
    cols = user_columns(doc)
    _taken_user(s, org_id, cols["user_name"])
    now = utcnow()
    row = User(id=new_id(), org_id=org_id, doc=doc, created_at=now, modified_at=now,
               version=1, **cols)
    s.add(row)
    s.flush()
    return row


def save_user(s: Session, row: User, doc: dict) -> User:
    cols = user_columns(doc)
    if cols["user_name_key"] != row.user_name_key:
        _taken_user(s, row.org_id, cols["user_name"], but=row.id)
    for k, v in cols.items():
        setattr(row, k, v)
    row.doc = doc
    row.modified_at = utcnow()
    row.version = row.version + 1
    s.flush()
    return row


def delete_user(s: Session, org_id: str, user_id: str) -> None:
    row = get_user(s, org_id, user_id, lock=True)
    s.execute(delete(Membership).where(
        Membership.member_id == row.id,
        Membership.group_id.in_(select(Group.id).where(Group.org_id == org_id))))
    s.delete(row)
    s.flush()


# --------------------------------------------------------------------------
# Groups


def create_group(s: Session, org_id: str, doc: dict) -> Group:
    cols = group_columns(doc)
    _taken_group(s, org_id, cols["display_name"])
    now = utcnow()
    row = Group(id=new_id(), org_id=org_id, doc=doc, source="scim", created_at=now,
                modified_at=now, version=1, last_sync_at=now, last_sync_op="create",
                last_sync_outcome="ok", **cols)
    s.add(row)
    s.flush()
    return row


def save_group(s: Session, row: Group, doc: dict) -> Group:
    cols = group_columns(doc)
    if cols["display_name_key"] != row.display_name_key:
        _taken_group(s, row.org_id, cols["display_name"], but=row.id)
    for k, v in cols.items():
        setattr(row, k, v)
    row.doc = doc
    return row


def mark_group(s: Session, row: Group, op: str, outcome: str = "ok") -> None:
    now = utcnow()
    row.modified_at = now
    row.version = row.version + 1
    row.last_sync_at = now
    row.last_sync_op = op[:64]
    row.last_sync_outcome = outcome
    s.flush()


def record_sync_failure(sessions, org_id: str, group_id: str, op: str, outcome: str) -> None:
    """Note a failed operation on the group in its own transaction, after
    the failed one was rolled back."""
    with sessions.begin() as s:
        s.execute(update(Group).where(*_scim_groups(org_id), Group.id == group_id)
                  .values(last_sync_at=utcnow(), last_sync_op=op[:64],
                          last_sync_outcome=outcome[:2000]))


def delete_group(s: Session, org_id: str, group_id: str) -> None:
    row = get_group(s, org_id, group_id, lock=True)
    # its own members go with it (foreign key); its place in other groups too
    s.execute(delete(Membership).where(
        Membership.member_id == row.id,
        Membership.group_id.in_(select(Group.id).where(Group.org_id == org_id))))
    s.execute(delete(Membership).where(Membership.group_id == row.id))
    s.delete(row)
    s.flush()


def _member_kinds(s: Session, org_id: str, group_id: str, ids: list[str],
                  types: list[str | None]) -> list[dict]:
    """The membership rows for ``ids``: each must be a User or a SCIM Group
    of the org (share-locked on PostgreSQL so it cannot vanish before
    commit); else 400 naming the unknown ones."""
    wanted: dict[str, str | None] = {}
    for mid, mtype in zip(ids, types):
        if mid == group_id:
            raise ScimError(400, f"members: a group cannot be a member of itself ({mid})",
                            INVALID_VALUE)
        wanted.setdefault(mid, mtype)
    found: dict[str, str] = {}
    unique = list(wanted)
    for part in _chunks(unique):
        for (uid,) in s.execute(select(User.id).where(User.org_id == org_id, User.id.in_(part))
                                .with_for_update(read=True)):
            found[uid] = "User"
        rest = [i for i in part if i not in found]
        if rest:
            for (gid,) in s.execute(select(Group.id).where(*_scim_groups(org_id),
                                                           Group.id.in_(rest))
                                    .with_for_update(read=True)):
                found[gid] = "Group"
    missing = [i for i in unique if i not in found]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ScimError(400, f"members: no User or Group with id {shown} in this org "
                             f"(provision members before adding them)", INVALID_VALUE)
    wrong = [i for i in unique if wanted[i] and wanted[i].casefold() != found[i].casefold()]
    if wrong:
        raise ScimError(400, f"members: {wrong[0]} is a {found[wrong[0]]}, not a "
                             f"{wanted[wrong[0]]}", INVALID_VALUE)
    return [{"group_id": group_id, "member_id": i, "member_type": found[i]} for i in unique]


def _insert_members(s: Session, rows: list[dict]) -> None:
    if not rows:
        return
    insert = pg_dialect.insert if _dialect(s) == "postgresql" else sqlite_dialect.insert
    stmt = insert(Membership).on_conflict_do_nothing()
    for part in _chunks(rows, 5000):
        s.execute(stmt, part)


def apply_members(s: Session, org_id: str, group_id: str, ops: list[MemberOp]) -> tuple[int, int]:
    """Apply member ops in order; returns (ids added, ids removed) as asked."""
    added = removed = 0
    for op in ops:
        if op.kind in ("add", "replace"):
            rows = _member_kinds(s, org_id, group_id, list(op.ids), list(op.types))
            if op.kind == "replace":
                s.execute(delete(Membership).where(Membership.group_id == group_id))
            _insert_members(s, rows)
            added += len(rows)
        elif op.kind == "remove":
            for part in _chunks(list(dict.fromkeys(op.ids))):
                removed += s.execute(delete(Membership).where(
                    Membership.group_id == group_id, Membership.member_id.in_(part))).rowcount
        elif op.kind == "remove_all":
            removed += s.execute(delete(Membership).where(
                Membership.group_id == group_id)).rowcount
        elif op.kind == "remove_where":
            cond = member_condition(op.filter, _dialect(s), Membership.__table__)
            removed += s.execute(delete(Membership).where(
                Membership.group_id == group_id, cond)).rowcount
    return added, removed


def replace_members(s: Session, org_id: str, group_id: str, members: list[dict]) -> None:
    from .patch import _member_values
    ids, types = _member_values(members)
    apply_members(s, org_id, group_id, [MemberOp("replace", ids, types)])


__all__ = ["search", "get_user", "get_group", "members_of", "groups_of", "create_user",
           "save_user", "delete_user", "create_group", "save_group", "mark_group",
           "record_sync_failure", "delete_group", "apply_members", "replace_members",
           "integrity_conflict"]
