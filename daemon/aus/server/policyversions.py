"""The draft, provisioning and the history of an org's policy.

The rules and ip_lists tables are the org's draft: management writes edit
them, and nothing reaches a workload until the draft is provisioned. A
provision stores an immutable snapshot (``PolicyVersion``): the draft's
spec (rules with their source group ids, IP lists) and the policy
document as the bundle carried it, with the note, the API key and the
time. The newest version is the one in force; the bundle is built from
its spec with the current groups and members (``bundle.content_from_spec``),
so directory changes still take effect at once.

A rollback provisions an old version's spec as a new version and resets
the draft to it; it is refused while the draft has pending changes, so no
edit is lost silently.
"""

from __future__ import annotations

import copy

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from ..core.bundle import BUNDLE_FORMAT, document_from_data
from ..core.errors import PolicyError
from ..core.policy import Policy
from . import audit, snapshots
from .bundle import active_spec, content_from_spec, rebuild
from .db import Bundle, Group, IpList, Org, PolicyVersion, Rule, RuleSource, utcnow

EMPTY_SPEC: dict = {"rules": [], "ip_lists": []}
RULE_FIELDS = ("name", "description", "sources", "destinations", "services")
MAX_NOTE = 2000


class PolicyConflict(Exception):
    """A provision or rollback that cannot happen as asked (HTTP 409/404/422)."""

    def __init__(self, status: int, message: str, fields: list[dict] | None = None):
        self.status = status
        self.message = message
        self.fields = fields or []
        super().__init__(message)


def draft_spec(s: Session, org_id: str) -> dict:
    """The draft (the tables) as a spec, rules in their order."""
    rules = s.scalars(select(Rule).where(Rule.org_id == org_id)
                      .order_by(Rule.position, Rule.name)).all()
    src: dict[str, list[str]] = {r.id: [] for r in rules}
    if rules:
        for rid, gid in s.execute(select(RuleSource.rule_id, RuleSource.group_id)
                                  .join(Rule, Rule.id == RuleSource.rule_id)
                                  .where(Rule.org_id == org_id).order_by(RuleSource.position)):
            src[rid].append(gid)
    names = group_names(s, org_id, {g for v in src.values() for g in v})
    lists = s.scalars(select(IpList).where(IpList.org_id == org_id).order_by(IpList.name)).all()
    return {
        "rules": [{"id": r.id, "name": r.name, "description": r.description or "",
                   "sources": [{"id": g, "name": names.get(g)} for g in src[r.id]],
                   "destinations": list(r.destinations), "services": list(r.services)}
                  for r in rules],
        "ip_lists": [{"id": l.id, "name": l.name, "entries": list(l.entries)} for l in lists],
    }


def group_names(s: Session, org_id: str, ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    return dict(s.execute(select(Group.id, Group.display_name)
                          .where(Group.org_id == org_id, Group.id.in_(ids))).all())


def active_version(s: Session, org_id: str) -> PolicyVersion | None:
    return s.scalar(select(PolicyVersion).where(PolicyVersion.org_id == org_id)
                    .order_by(PolicyVersion.version.desc()).limit(1))


def get_version(s: Session, org_id: str, version: int) -> PolicyVersion | None:
    return s.get(PolicyVersion, (org_id, version))


# -- diff ----------------------------------------------------------------------


def _rule_cmp(r: dict) -> dict:
    return {"name": r["name"], "description": r.get("description", ""),
            "sources": [src["id"] for src in r["sources"]],
            "destinations": r["destinations"], "services": r["services"]}


def _side(items: list[dict], key, cmp) -> dict:
    return {key(i): (i, cmp(i)) for i in items}


def _diff_items(before: list[dict], after: list[dict], key, cmp) -> dict:
    b, a = _side(before, key, cmp), _side(after, key, cmp)
    return {
        "added": [a[k][0] for k in a if k not in b],
        "changed": [{"before": b[k][0], "after": a[k][0]} for k in a
                    if k in b and a[k][1] != b[k][1]],
        "removed": [b[k][0] for k in b if k not in a],
    }


def diff_specs(before: dict, after: dict, names: dict[str, str] | None = None) -> dict:
    """Added, changed and removed rules (by id: a renamed rule is changed)
    and IP lists (by name: that is what rules refer to). ``names``: group
    id -> current name, shown beside the name the spec recorded."""
    rules = _diff_items(before["rules"], after["rules"], lambda r: r["id"], _rule_cmp)
    lists = _diff_items(before["ip_lists"], after["ip_lists"], lambda l: l["name"],
                        lambda l: l["entries"])
    if names is not None:
        for part in (rules["added"], rules["removed"],
                     [x for c in rules["changed"] for x in (c["before"], c["after"])]):
            for r in part:
                for src in r["sources"]:
                    src["current_name"] = names.get(src["id"])
    changes = sum(len(v) for d in (rules, lists) for v in d.values())
    return {"rules": rules, "ip_lists": lists, "changes": changes}


def spec_group_ids(*specs: dict) -> set[str]:
    return {src["id"] for spec in specs for r in spec["rules"] for src in r["sources"]}


def draft_view(s: Session, org_id: str) -> dict:
    """The pending changes: the draft against the version in force."""
    cur = active_version(s, org_id)
    before = copy.deepcopy(cur.spec) if cur is not None else EMPTY_SPEC
    after = draft_spec(s, org_id)
    d = diff_specs(before, after, group_names(s, org_id, spec_group_ids(before, after)))
    return {"pending": d["changes"] > 0, "active_version": cur.version if cur else 0, **d}


def pending(s: Session, org_id: str) -> bool:
    cur = active_version(s, org_id)
    return diff_specs(cur.spec if cur else EMPTY_SPEC, draft_spec(s, org_id))["changes"] > 0


# -- the draft's policy ------------------------------------------------------


def spec_policy(s: Session, org_id: str, spec: dict) -> Policy:
    """The policy a spec compiles to with the current groups, validated
    as the daemon validates a bundle (PolicyError when it would refuse it)."""
    content = content_from_spec(s, org_id, spec)
    doc = document_from_data({"format": BUNDLE_FORMAT, "org": org_id, "version": 1,
                              "generated_at": "1970-01-01T00:00:00Z", **content},
                             f"the draft of org {org_id}")
    return doc.policy


# -- provision, discard, rollback ------------------------------------------------


def restore_draft(s: Session, org_id: str, spec: dict) -> None:
    """Make the tables hold ``spec`` (ids kept)."""
    s.execute(delete(Rule).where(Rule.org_id == org_id))
    s.execute(delete(IpList).where(IpList.org_id == org_id))
    s.flush()
    now = utcnow()
    for lst in spec["ip_lists"]:
        s.add(IpList(id=lst["id"], org_id=org_id, name=lst["name"], entries=list(lst["entries"]),
                     modified_at=now))
    for pos, r in enumerate(spec["rules"], start=1):
        s.add(Rule(id=r["id"], org_id=org_id, name=r["name"], description=r.get("description", ""),
                   destinations=list(r["destinations"]), services=list(r["services"]),
                   position=pos, created_at=now, modified_at=now))
    s.flush()
    for r in spec["rules"]:
        for i, src in enumerate(r["sources"]):
            s.add(RuleSource(rule_id=r["id"], group_id=src["id"], position=i))
    s.flush()


def _publish(s: Session, org_id: str, spec: dict, note: str, key_id: str | None,
             rolled_back_from: int | None = None) -> PolicyVersion:
    """Store ``spec`` as the new version in force and rebuild the bundle
    with it (its version is the bundle version that first carries it)."""
    try:
        policy = spec_policy(s, org_id, spec)
    except PolicyError as exc:
        raise PolicyConflict(422, "the draft cannot be provisioned: workloads would refuse it",
                             [{"field": "policy", "message": p} for p in exc.problems]) from None
    # Numbered as the bundle that first carries it.
    current = s.get(Bundle, org_id, with_for_update=True)
    last = s.scalar(select(func.max(PolicyVersion.version)).where(PolicyVersion.org_id == org_id))
    version = max(current.version if current is not None else 0, last or 0) + 1
    row = PolicyVersion(org_id=org_id, version=version, spec=spec,
                        policy=policy.model_dump(mode="json", exclude_none=True),
                        note=note, key_id=key_id, rolled_back_from=rolled_back_from,
                        created_at=utcnow())
    s.add(row)
    s.flush()
    bundle = rebuild(s, org_id, force_version=version)
    if bundle.build_error is not None or bundle.version != version:
        raise PolicyConflict(422, "the draft cannot be provisioned: the bundle build failed",
                             [{"field": "policy", "message": bundle.build_error or "not built"}])
    return row


def _note(note: str) -> str:
    if len(note) > MAX_NOTE:
        raise PolicyConflict(422, "the note is not valid",
                             [{"field": "note", "message": f"longer than {MAX_NOTE} characters"}])
    return note.strip()


def _lock(s: Session, org_id: str) -> None:
    """The org row FOR UPDATE, first: the bundle rebuild this transaction
    ends with takes that lock, and upgrading to it from the write-time
    checks' weaker lock would deadlock with writers holding key-share
    locks on the org (any insert of a row that references it)."""
    s.execute(select(Org.id).where(Org.id == org_id).with_for_update())


def _record(s: Session, org_id: str, key_id: str | None, action: str, cur: PolicyVersion | None,
            row: PolicyVersion, diff: dict) -> None:
    after = {**snapshots.version(row), "changes": snapshots.changes(diff)}
    audit.record(s, org_id, key_id, action, f"version {row.version}",
                 before=snapshots.version(cur), after=after)


def provision(s: Session, org_id: str, key_id: str | None, note: str) -> PolicyVersion:
    _lock(s, org_id)
    note = _note(note)
    cur = active_version(s, org_id)
    spec = draft_spec(s, org_id)
    diff = diff_specs(cur.spec if cur else EMPTY_SPEC, spec)
    if diff["changes"] == 0:
        raise PolicyConflict(409, "the draft has no pending changes; nothing to provision")
    row = _publish(s, org_id, spec, note, key_id)
    _record(s, org_id, key_id, "policy.provision", cur, row, diff)
    return row


def discard(s: Session, org_id: str, key_id: str | None) -> None:
    """Reset the draft to the version in force; the audit record keeps
    the discarded draft whole (``before``), so nothing discarded is lost."""
    _lock(s, org_id)
    before = draft_spec(s, org_id)
    restore_draft(s, org_id, active_spec(s, org_id))
    after = draft_spec(s, org_id)
    if diff_specs(before, after)["changes"]:
        audit.record(s, org_id, key_id, "draft.discard", "draft", before=before, after=after)


def rollback(s: Session, org_id: str, version: int, key_id: str | None,
             note: str) -> PolicyVersion:
    _lock(s, org_id)
    note = _note(note)
    old = get_version(s, org_id, version)
    if old is None:
        raise PolicyConflict(404, f"no policy version {version} in this org")
    cur = active_version(s, org_id)
    if pending(s, org_id):
        raise PolicyConflict(409, "the draft has pending changes; provision or discard them "
                                  "before rolling back")
    if cur is not None and cur.version == version:
        raise PolicyConflict(409, f"version {version} is the version in force")
    restore_draft(s, org_id, copy.deepcopy(old.spec))
    row = _publish(s, org_id, copy.deepcopy(old.spec), note or f"rollback to version {version}", key_id,
                   rolled_back_from=version)
    _record(s, org_id, key_id, "policy.rollback", cur, row,
            diff_specs(cur.spec if cur else EMPTY_SPEC, old.spec))
    return row


def version_view(v: PolicyVersion, *, full: bool = False) -> dict:
    out = {"version": v.version, "note": v.note, "key_id": v.key_id,
           "created_at": v.created_at.strftime("%Y-%m-%dT%H:%M:%SZ") if v.created_at else None,
           "rolled_back_from": v.rolled_back_from,
           "rules": len(v.spec["rules"]), "ip_lists": len(v.spec["ip_lists"])}
    if full:
        out["spec"] = v.spec
        out["policy"] = v.policy
    return out
