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
