"""SCIM reads and writes on the store, inside the caller's transaction.

Statements are SQLAlchemy Core on the session's connection (no ORM
objects: a lookup or a member PATCH is a handful of statements and little
Python), with ``RETURNING`` so a write and the read of its result are one
round trip. Every query is scoped to one org. Groups seen over SCIM are
the ones SCIM created (``source`` "scim"); groups an administrator added
by hand stay out of the directory's reach, though their names still count
for uniqueness.

Lock order, the same in every write: the resource row first (a group
write starts with the UPDATE that records it), then the member rows
(share-locked on PostgreSQL, so a user deleted at the same moment cannot
leave a membership behind), then the org row (``bundle.touch``), last.

Member writes are bulk statements: ids are checked with ``IN`` queries in
chunks, added with ``INSERT ... ON CONFLICT DO NOTHING`` (multi-row
batches) and removed with ``DELETE ... IN``; adding a member twice, or two
requests adding members at once, never fails nor loses one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    ARRAY,
    String,
    bindparam,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..db import Group, Membership, User, fold, utcnow
from .errors import INVALID_VALUE, UNIQUENESS, ScimError, not_found
from .filter import Compare, Node
from .patch import MemberOp, member_values
from .query import Compiler, member_condition
from .resources import USER, Kind, group_columns, user_columns

CHUNK = 900            # ids per IN (...): within every engine's parameter limit

U = User.__table__
G = Group.__table__
M = Membership.__table__
USER_COLS = (U.c.id, U.c.doc, U.c.created_at, U.c.modified_at, U.c.version, U.c.user_name_key)
GROUP_COLS = (G.c.id, G.c.doc, G.c.created_at, G.c.modified_at, G.c.version,
              G.c.display_name_key)


# The statements of the hot paths, built once (SQLAlchemy caches their SQL).
_USER_BY_ID = select(*USER_COLS).where(U.c.org_id == bindparam("org"), U.c.id == bindparam("uid"))
_USER_BY_ID_LOCKED = _USER_BY_ID.with_for_update()
_USER_BY_KEY = select(*USER_COLS).where(U.c.org_id == bindparam("org"),
                                        U.c.user_name_key == bindparam("key"))
_GROUP_BY_ID = select(*GROUP_COLS).where(G.c.org_id == bindparam("org"), G.c.source == "scim",
                                         G.c.id == bindparam("gid"))
_GROUP_BY_KEY = select(*GROUP_COLS).where(G.c.org_id == bindparam("org"), G.c.source == "scim",
                                          G.c.display_name_key == bindparam("key"))
_USER_TAKEN = select(U.c.id).where(U.c.org_id == bindparam("org"),
                                   U.c.user_name_key == bindparam("key"), U.c.id != bindparam("but"))
_GROUP_TAKEN = select(G.c.id, G.c.source).where(G.c.org_id == bindparam("org"),
                                                G.c.display_name_key == bindparam("key"),
                                                G.c.id != bindparam("but"))
_BEGIN_GROUP_WRITE = (
    update(G).where(G.c.org_id == bindparam("org"), G.c.source == "scim", G.c.id == bindparam("gid"))
    .values(version=G.c.version + 1, modified_at=bindparam("now"), last_sync_at=bindparam("now"),
            last_sync_op=bindparam("op"), last_sync_outcome="ok")
    .returning(*GROUP_COLS))
# SQLite has one writer at a time: no row locks are needed (nor exist)
_USERS_IN = select(U.c.id).where(U.c.org_id == bindparam("org"),
                                 U.c.id.in_(bindparam("ids", expanding=True)))
_GROUPS_IN = select(G.c.id).where(G.c.org_id == bindparam("org"), G.c.source == "scim",
                                  G.c.id.in_(bindparam("ids", expanding=True)))
_INSERT_MEMBERS = sqlite_dialect.insert(M).on_conflict_do_nothing()


def new_id() -> str:
    return str(uuid.uuid4())


def _conn(s: Session) -> Connection:
    return s.connection()


def _scim_groups(org_id: str):
    return (G.c.org_id == org_id, G.c.source == "scim")


def _chunks(items: list, n: int = CHUNK) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# --------------------------------------------------------------------------
# Reads


def get_user(s: Session, org_id: str, user_id: str, *, lock: bool = False) -> Row:
    q = _USER_BY_ID_LOCKED if lock else _USER_BY_ID
    row = _conn(s).execute(q, {"org": org_id, "uid": user_id}).first()
    if row is None:
        raise not_found(f"no User with id {user_id!r}")
    return row


def get_group(s: Session, org_id: str, group_id: str) -> Row:
    row = _conn(s).execute(_GROUP_BY_ID, {"org": org_id, "gid": group_id}).first()
    if row is None:
        raise not_found(f"no Group with id {group_id!r}")
    return row


def search(s: Session, kind: Kind, org_id: str, node: Node | None, start: int,
           count: int) -> tuple[int, list[Row]]:
    """``(totalResults, rows)`` for a filter and a 1-based page."""
    conn = _conn(s)
    name = _name_equals(kind, node)
    if name is not None and start == 1 and count > 0:
        # userName / displayName eq "...": one probe of the unique index
        rows = conn.execute(_USER_BY_KEY if kind is USER else _GROUP_BY_KEY,
                            {"org": org_id, "key": fold(name)}).all()
        return len(rows), rows
    if kind is USER:
        cols, where, key = USER_COLS, [U.c.org_id == org_id], U.c.user_name_key
    else:
        cols, where, key = GROUP_COLS, list(_scim_groups(org_id)), G.c.display_name_key
    if node is not None:
        where.append(Compiler(kind, conn.dialect.name).compile(node))
    rows: list[Row] = []
    if count > 0:
        # (org_id, *_key) is the unique index: the page comes in index order
        rows = conn.execute(select(*cols).where(*where).order_by(key)
                            .offset(start - 1).limit(count)).all()
    if start == 1 and len(rows) < count:
        total = len(rows)               # the common single-match lookup: no COUNT
    else:
        table = U if kind is USER else G
        total = conn.execute(select(func.count()).select_from(table).where(*where)).scalar()
    return total, rows


def _name_equals(kind: Kind, node: Node | None) -> str | None:
    """The value of a filter that is just ``userName eq "..."`` (users) or
    ``displayName eq "..."`` (groups): Entra's most frequent request."""
    if isinstance(node, Compare) and node.op == "eq" and isinstance(node.value, str) \
            and node.attr.sub is None and node.attr.uri is None:
        want = "username" if kind is USER else "displayname"
        if node.attr.name.casefold() == want:
            return node.value
    return None


def members_of(s: Session, group_ids: list[str]) -> dict[str, list[tuple[str, str, str | None]]]:
    """group id -> [(member id, "User"|"Group", display)], one query per chunk."""
    out: dict[str, list] = {g: [] for g in group_ids}
    conn = _conn(s)
    mg = G.alias("member_group")
    for part in _chunks(group_ids):
        rows = conn.execute(
            select(M.c.group_id, M.c.member_id, M.c.member_type,
                   func.coalesce(U.c.display_name, U.c.user_name, mg.c.display_name))
            .select_from(M)
            .outerjoin(U, (U.c.id == M.c.member_id) & (M.c.member_type == "User"))
            .outerjoin(mg, (mg.c.id == M.c.member_id) & (M.c.member_type == "Group"))
            .where(M.c.group_id.in_(part))
            .order_by(M.c.group_id, M.c.member_id))
        for gid, mid, mtype, display in rows:
            out[gid].append((mid, mtype, display))
    return out


def groups_of(s: Session, org_id: str, user_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """user id -> [(group id, display name)] of the groups it is directly in."""
    out: dict[str, list] = {u: [] for u in user_ids}
    conn = _conn(s)
    for part in _chunks(user_ids):
        rows = conn.execute(
            select(M.c.member_id, G.c.id, G.c.display_name)
            .select_from(M).join(G, G.c.id == M.c.group_id)
            .where(M.c.member_id.in_(part), *_scim_groups(org_id))
            .order_by(G.c.display_name_key))
        for uid, gid, name in rows:
            out[uid].append((gid, name))
    return out


# --------------------------------------------------------------------------
# Uniqueness


def _taken_user(s: Session, org_id: str, name: str, but: str | None = None) -> None:
    other = _conn(s).execute(_USER_TAKEN, {"org": org_id, "key": fold(name),
                                            "but": but or ""}).scalar()
    if other:
        raise ScimError(409, f"userName {name!r} is already taken by User {other} "
                             f"(userName compares case-insensitively)", UNIQUENESS)


def _taken_group(s: Session, org_id: str, name: str, but: str | None = None) -> None:
    row = _conn(s).execute(_GROUP_TAKEN, {"org": org_id, "key": fold(name),
                                          "but": but or ""}).first()
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


def _insert_new(s: Session, table, cols) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING cols``, built once per
    dialect: a name already taken returns no row (then the caller says by
    whom), in one statement instead of a check and an insert."""
    conn = _conn(s)
    key = (conn.dialect.name, table.name)
    stmt = _INSERTS.get(key)
    if stmt is None:
        make = pg_dialect.insert if conn.dialect.name == "postgresql" else sqlite_dialect.insert
        stmt = _INSERTS[key] = make(table).on_conflict_do_nothing().returning(*cols)
    return conn, stmt


_INSERTS: dict[tuple[str, str], Any] = {}


def create_user(s: Session, org_id: str, doc: dict) -> Row:
    cols = user_columns(doc)
    now = utcnow()
    conn, stmt = _insert_new(s, U, USER_COLS)
    row = conn.execute(stmt, {"id": new_id(), "org_id": org_id, "doc": doc, "created_at": now,
                              "modified_at": now, "version": 1, **cols}).first()
    if row is None:
        _taken_user(s, org_id, cols["user_name"])
        raise ScimError(409, "the User conflicts with another one", UNIQUENESS)
    return row


def save_user(s: Session, org_id: str, row: Row, doc: dict) -> Row:
    cols = user_columns(doc)
    if cols["user_name_key"] != row.user_name_key:
        _taken_user(s, org_id, cols["user_name"], but=row.id)
    return _conn(s).execute(
        update(U).where(U.c.id == row.id, U.c.org_id == org_id)
        .values(doc=doc, modified_at=utcnow(), version=U.c.version + 1, **cols)
        .returning(*USER_COLS)).one()


def delete_user(s: Session, org_id: str, user_id: str) -> int:
    """Delete the user and its memberships; returns the version it had."""
    conn = _conn(s)
    version = conn.execute(delete(U).where(U.c.org_id == org_id, U.c.id == user_id)
                           .returning(U.c.version)).scalar()
    if version is None:
        raise not_found(f"no User with id {user_id!r}")
    conn.execute(delete(M).where(M.c.member_id == user_id,
                                 M.c.group_id.in_(select(G.c.id).where(G.c.org_id == org_id))))
    return version


# --------------------------------------------------------------------------
# Groups


def create_group(s: Session, org_id: str, doc: dict) -> Row:
    cols = group_columns(doc)
    now = utcnow()
    conn, stmt = _insert_new(s, G, GROUP_COLS)
    row = conn.execute(stmt, {"id": new_id(), "org_id": org_id, "doc": doc, "source": "scim",
                              "created_at": now, "modified_at": now, "version": 1,
                              "last_sync_at": now, "last_sync_op": "create",
                              "last_sync_outcome": "ok", **cols}).first()
    if row is None:
        _taken_group(s, org_id, cols["display_name"])
        raise ScimError(409, "the Group conflicts with another one", UNIQUENESS)
    return row


def begin_group_write(s: Session, org_id: str, group_id: str, op: str) -> Row:
    """Lock the group by recording this write on it (version, modified,
    last sync "ok": the transaction commits only if the write succeeds)."""
    row = _conn(s).execute(_BEGIN_GROUP_WRITE, {"org": org_id, "gid": group_id,
                                                "now": utcnow(), "op": op[:64]}).first()
    if row is None:
        raise not_found(f"no Group with id {group_id!r}")
    return row


def save_group(s: Session, org_id: str, row: Row, doc: dict) -> Row:
    cols = group_columns(doc)
    if cols["display_name_key"] != row.display_name_key:
        _taken_group(s, org_id, cols["display_name"], but=row.id)
    return _conn(s).execute(update(G).where(G.c.id == row.id, G.c.org_id == org_id)
                            .values(doc=doc, **cols).returning(*GROUP_COLS)).one()


def record_sync_failure(s: Session, org_id: str, group_id: str, op: str, outcome: str) -> None:
    """Note a failed operation on the group; the caller runs this in a
    transaction of its own, after the failed one was rolled back."""
    _conn(s).execute(update(G).where(*_scim_groups(org_id), G.c.id == group_id)
                     .values(last_sync_at=utcnow(), last_sync_op=op[:64],
                             last_sync_outcome=outcome[:2000]))


def delete_group(s: Session, org_id: str, group_id: str) -> int:
    """Delete the group (its own memberships go with it, by foreign key)
    and its place in other groups; returns the version it had."""
    conn = _conn(s)
    version = conn.execute(delete(G).where(*_scim_groups(org_id), G.c.id == group_id)
                           .returning(G.c.version)).scalar()
    if version is None:
        raise not_found(f"no Group with id {group_id!r}")
    conn.execute(delete(M).where(M.c.member_id == group_id,
                                 M.c.group_id.in_(select(G.c.id).where(G.c.org_id == org_id))))
    return version


# PostgreSQL: check, share-lock and insert in one round trip. The data-
# modifying CTE runs once; its result is what was found, so the ids that
# were not can be named (and the insert rolled back with the transaction).
_PG_ADD_MEMBERS = text("""
    WITH u AS (SELECT id FROM users WHERE org_id = :org AND id = ANY(:ids) FOR SHARE),
         g AS (SELECT id FROM groups WHERE org_id = :org AND source = 'scim'
                                       AND id = ANY(:ids) FOR SHARE),
         found AS (SELECT id, 'User' AS member_type FROM u
                   UNION ALL SELECT id, 'Group' FROM g),
         ins AS (INSERT INTO memberships (group_id, member_id, member_type)
                 SELECT :gid, id, member_type FROM found ON CONFLICT DO NOTHING)
    SELECT id, member_type FROM found
""").bindparams(bindparam("ids", type_=ARRAY(String)))


def add_members(s: Session, org_id: str, group_id: str, ids: list[str],
                types: list[str | None]) -> None:
    """Add members, idempotently. Each must be a User or a SCIM Group of the
    org, share-locked until commit (PostgreSQL) so that a user deleted at
    the same moment cannot leave a membership behind; else 400 naming the
    unknown ones (the caller's transaction is then rolled back)."""
    wanted: dict[str, str | None] = {}
    for mid, mtype in zip(ids, types):
        if mid == group_id:
            raise ScimError(400, f"members: a group cannot be a member of itself ({mid})",
                            INVALID_VALUE)
        wanted.setdefault(mid, mtype)
    unique = list(wanted)
    conn = _conn(s)
    found: dict[str, str] = {}
    if conn.dialect.name == "postgresql":
        for part in _chunks(unique, 5000):
            found.update(conn.execute(_PG_ADD_MEMBERS, {"org": org_id, "gid": group_id,
                                                        "ids": part}).all())
    else:
        for part in _chunks(unique):
            for (uid,) in conn.execute(_USERS_IN, {"org": org_id, "ids": part}):
                found[uid] = "User"
            rest = [i for i in part if i not in found]
            if rest:
                for (gid,) in conn.execute(_GROUPS_IN, {"org": org_id, "ids": rest}):
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
    if conn.dialect.name != "postgresql":
        rows = [{"group_id": group_id, "member_id": i, "member_type": found[i]} for i in unique]
        for part in _chunks(rows, 5000):
            conn.execute(_INSERT_MEMBERS, part)


def apply_members(s: Session, org_id: str, group_id: str, ops: list[MemberOp]) -> None:
    """Apply member ops in order, each as one or a few bulk statements."""
    conn = _conn(s)
    for op in ops:
        if op.kind in ("add", "replace"):
            if op.kind == "replace":
                conn.execute(delete(M).where(M.c.group_id == group_id))
            add_members(s, org_id, group_id, list(op.ids), list(op.types))
        elif op.kind == "remove":
            for part in _chunks(list(dict.fromkeys(op.ids))):
                conn.execute(delete(M).where(M.c.group_id == group_id, M.c.member_id.in_(part)))
        elif op.kind == "remove_all":
            conn.execute(delete(M).where(M.c.group_id == group_id))
        elif op.kind == "remove_where":
            conn.execute(delete(M).where(M.c.group_id == group_id,
                                         member_condition(op.filter, conn.dialect.name, M)))


def replace_members(s: Session, org_id: str, group_id: str, members: list[Any]) -> None:
    ids, types = member_values(members)
    apply_members(s, org_id, group_id, [MemberOp("replace", ids, types)])
