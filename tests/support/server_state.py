"""What an org's data looks like from outside and inside, to prove that a
refused request changed nothing and that a fuzzed server is still whole."""

from __future__ import annotations

from sqlalchemy import text

from aus.server.db import fold, open_database

SCIM_ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"


def fingerprint(engine, org: str) -> tuple:
    """Counts and versions of everything a write could change in ``org``
    (the per-group note of the last failed sync is not data)."""
    with engine.connect() as c:
        return tuple(c.execute(text(q), {"org": org}).one() for q in (
            "SELECT count(*), coalesce(sum(version), 0) FROM users WHERE org_id = :org",
            "SELECT count(*), coalesce(sum(version), 0) FROM groups WHERE org_id = :org",
            "SELECT count(*) FROM memberships m JOIN groups g ON g.id = m.group_id "
            "WHERE g.org_id = :org",
            "SELECT count(*) FROM rules WHERE org_id = :org",
            "SELECT count(*) FROM ip_lists WHERE org_id = :org",
            "SELECT coalesce(max(generation), 0) FROM orgs WHERE id = :org",
        ))


def integrity_problems(db_url: str) -> list[str]:
    """The engine's own check, then what the schema cannot state: no
    membership of a missing user or group, every name key the fold of its
    name."""
    engine, _sessions = open_database(db_url)
    problems: list[str] = []
    try:
        with engine.connect() as c:
            if engine.dialect.name == "sqlite":
                ok = c.execute(text("PRAGMA integrity_check")).scalar()
                if ok != "ok":
                    problems.append(f"integrity_check: {ok}")
                problems += [f"foreign key: {tuple(r)}"
                             for r in c.execute(text("PRAGMA foreign_key_check"))]
            orphans = c.execute(text(
                "SELECT m.group_id, m.member_id FROM memberships m "
                "LEFT JOIN users u ON m.member_type = 'User' AND u.id = m.member_id "
                "LEFT JOIN groups g ON m.member_type = 'Group' AND g.id = m.member_id "
                "WHERE u.id IS NULL AND g.id IS NULL")).all()
            problems += [f"membership of a missing member: {tuple(r)}" for r in orphans]
            for name, key in c.execute(text("SELECT user_name, user_name_key FROM users")):
                if fold(name) != key:
                    problems.append(f"user {name!r} has key {key!r}")
            for name, key in c.execute(text("SELECT display_name, display_name_key FROM groups")):
                if fold(name) != key:
                    problems.append(f"group {name!r} has key {key!r}")
    finally:
        engine.dispose()
    return problems


def scim_listing(client, org: str, token: str, kind: str) -> list[dict]:
    """Every resource of ``kind`` ("Users"/"Groups"), page by page."""
    out: list[dict] = []
    start = 1
    while True:
        r = client.get(f"/scim/orgs/{org}/{kind}", params={"startIndex": start, "count": 200},
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        page = r.json()["Resources"]
        out += page
        if not page:
            return out
        start += len(page)
