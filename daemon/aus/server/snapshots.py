"""What the audit trail stores of each kind of object as its ``before``
and ``after``: plain JSON, read inside the changing transaction, so a
record shows the object exactly as the change found and left it.

Rules and IP lists take the shape of a policy version's spec
(``policyversions.draft_spec``), so a rule's record reads like a rule in
the history. The list of what a record holds per action is in
docs/audit.md.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import Group, IpList, PolicyVersion, Rule, RuleSource

ORG_DEFAULT = "org"   # the target of the org's default mode (a workload's: "workload:NAME")


def rule(s: Session, org_id: str, r: Rule) -> dict:
    """A rule with its source groups (id and name, in order)."""
    ids = list(s.scalars(select(RuleSource.group_id).where(RuleSource.rule_id == r.id)
                         .order_by(RuleSource.position)))
    names = dict(s.execute(select(Group.id, Group.display_name)
                           .where(Group.org_id == org_id, Group.id.in_(ids))).all()) if ids else {}
    return {"id": r.id, "name": r.name, "description": r.description or "",
            "sources": [{"id": g, "name": names.get(g)} for g in ids],
            "destinations": list(r.destinations), "services": list(r.services)}


def ip_list(row: IpList) -> dict:
    return {"id": row.id, "name": row.name, "entries": list(row.entries)}


def group(s: Session, g: Group) -> dict:
    """A user group, with the rules that name it as a source (a deleted
    group leaves them pointing at nothing)."""
    rules = s.execute(select(Rule.id, Rule.name).join(RuleSource, RuleSource.rule_id == Rule.id)
                      .where(RuleSource.group_id == g.id, Rule.org_id == g.org_id)
                      .order_by(Rule.name)).all()
    return {"id": g.id, "display_name": g.display_name, "sid": g.sid, "source": g.source,
            "external_id": g.external_id, "rules": [{"id": i, "name": n} for i, n in rules]}


def mode(workload: str, value: str | None) -> dict | None:
    """An enforcement mode setting; None where none is set. ``workload``
    "" is the org's default."""
    if value is None:
        return None
    return {"workload": workload or None, "mode": value}


def mode_target(workload: str) -> str:
    return f"workload:{workload}" if workload else ORG_DEFAULT


def version(v: PolicyVersion | None) -> dict | None:
    """A provisioned version: its number, note and size (its full spec is
    in the history, GET policy/versions/{version})."""
    if v is None:
        return None
    return {"version": v.version, "note": v.note, "rolled_back_from": v.rolled_back_from,
            "rules": len(v.spec["rules"]), "ip_lists": len(v.spec["ip_lists"])}


def changes(diff: dict) -> dict:
    """A spec diff (``policyversions.diff_specs``) by name: what a
    provision or rollback added, changed and removed."""
    def names(d: dict, name) -> dict:
        return {"added": [name(x) for x in d["added"]],
                "changed": [name(c["after"]) for c in d["changed"]],
                "removed": [name(x) for x in d["removed"]]}

    return {"rules": names(diff["rules"], lambda r: r["name"]),
            "ip_lists": names(diff["ip_lists"], lambda lst: lst["name"])}
