"""Rows written straight into the store, for tests of what reads them
(the SCIM tests create the same rows through the protocol)."""

from __future__ import annotations

import uuid

from aus.server.bundle import touch
from aus.server.db import Group, Membership, User, fold, open_database, utcnow


def seed(db_url: str, org: str, *, groups: dict[str, list[str]], users: list[str] = (),
         inactive: tuple[str, ...] = (), nested: dict[str, list[str]] | None = None,
         external_ids: dict[str, str] | None = None) -> dict[str, str]:
    """Create users and SCIM-sourced groups with immediate members; return
    name -> id for both."""
    engine, sessions = open_database(db_url)
    ids: dict[str, str] = {}
    try:
        with sessions.begin() as s:
            names = set(users) | {u for ms in groups.values() for u in ms}
            for name in sorted(names):
                ids[name] = str(uuid.uuid4())
                s.add(User(id=ids[name], org_id=org, user_name=name, user_name_key=fold(name),
                           active=name not in inactive, doc={"userName": name}))
            now = utcnow()
            for gname in groups:
                ids[gname] = str(uuid.uuid4())
                s.add(Group(id=ids[gname], org_id=org, display_name=gname,
                            display_name_key=fold(gname), source="scim", doc={},
                            external_id=(external_ids or {}).get(gname),
                            last_sync_at=now, last_sync_op="create", last_sync_outcome="ok"))
            s.flush()
            for gname, members in groups.items():
                for m in members:
                    s.add(Membership(group_id=ids[gname], member_id=ids[m], member_type="User"))
            for parent, children in (nested or {}).items():
                for c in children:
                    s.add(Membership(group_id=ids[parent], member_id=ids[c], member_type="Group"))
            touch(s, org)
    finally:
        engine.dispose()
    return ids


def insert_rule_past_api(db_url: str, org: str, name: str, group_id: str) -> None:
    """A rule written into the store past the API (an older server, a hand
    edit): raw SQL, so none of the application's keys or checks apply."""
    from sqlalchemy import text

    engine, sessions = open_database(db_url)
    try:
        with sessions.begin() as s:
            rid = str(uuid.uuid4())
            s.execute(text("INSERT INTO rules (id, org_id, name, description, destinations, services,"
                           " position, created_at, modified_at) VALUES (:id, :org, :name, '',"
                           " '[\"10.9.0.0/16\"]', '[\"22/tcp\"]', 99, :now, :now)"),
                      {"id": rid, "org": org, "name": name, "now": "2026-12-01 00:00:00"})
            s.execute(text("INSERT INTO rule_sources (rule_id, group_id, position) "
                           "VALUES (:r, :g, 0)"), {"r": rid, "g": group_id})
            provision_past_api(s, org)
            touch(s, org)
    finally:
        engine.dispose()


def provision_past_api(s, org: str) -> None:
    """Make the org's draft (its rules and IP lists as they are in the
    store) the policy in force without the provision's checks, as a hand
    edit of the store would; in the caller's transaction."""
    from sqlalchemy import func, select

    from aus.server.db import PolicyVersion
    from aus.server.policyversions import draft_spec

    last = s.scalar(select(func.max(PolicyVersion.version)).where(PolicyVersion.org_id == org))
    s.add(PolicyVersion(org_id=org, version=(last or 0) + 1, spec=draft_spec(s, org), policy={},
                        note="written past the API", key_id=None, created_at=utcnow()))
