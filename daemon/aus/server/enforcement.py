"""The enforcement mode set on the server: an org default and per-workload
modes, what the bundle carries of them, and what the Workloads page shows.

A workload's mode is its own when one is set (by name, even before it
first checks in), else the org's default. New orgs start in
``visibility``: nothing an operator does first can cut a user off, and
the would-be denials are visible before anyone turns enforcement on.
Orgs from before modes existed have no default: their bundles say
nothing until one is set, so an upgrade never changes what a running
fleet enforces. ausd applies what the bundle says unless its own
ausd.yaml sets ``mode`` (see docs/enforcement-mode.md).

Every change bumps the org's generation in its transaction, so the
bundle is rebuilt and long polls wake with it, and is recorded in the
audit trail ("mode.set") in that transaction.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..core.bundle import MAX_WORKLOAD_NAME, MODES
from . import audit, snapshots
from .db import EnforcementMode, Flow, Workload, flows_seen_since, utcnow

NEW_ORG_DEFAULT = "visibility"
ORG = ""                        # the workload column of the org's default row
COUNT_WINDOW = dt.timedelta(hours=1)


class ModeRefused(ValueError):
    """A mode or workload name the server does not take: ``field`` says where."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def parse_mode_body(body: Any, *, allow_null: bool) -> str | None:
    """The mode of a ``{"mode": ...}`` body (None: back to the default)."""
    if not isinstance(body, dict):
        raise ModeRefused("body", 'expected a JSON object {"mode": "visibility" | "enforce"}')
    extra = sorted(k for k in body if k != "mode")
    if extra:
        raise ModeRefused(extra[0], f"unknown key {extra[0]!r} (the only key is 'mode')")
    if "mode" not in body:
        raise ModeRefused("mode", "required: 'visibility' or 'enforce'"
                          + (", or null for the org's default" if allow_null else ""))
    mode = body["mode"]
    if mode is None and allow_null:
        return None
    if mode not in MODES:
        allowed = "'visibility' or 'enforce'" + (" or null" if allow_null else "")
        raise ModeRefused("mode", f"expected {allowed}, got {mode!r}"[:300])
    return mode


def check_workload_name(name: str) -> str:
    if not name.strip() or len(name) > MAX_WORKLOAD_NAME or not name.isprintable():
        raise ModeRefused("name", f"{name[:80]!r} is not a workload name (1 to "
                          f"{MAX_WORKLOAD_NAME} printable characters, not only spaces)")
    return name


def new_org(session: Session, org_id: str) -> None:
    """Give a just-created org its default mode."""
    session.add(EnforcementMode(org_id=org_id, workload=ORG, mode=NEW_ORG_DEFAULT,
                                changed_by=""))


def set_mode(session: Session, org_id: str, workload: str, mode: str | None,
             who: str) -> bool:
    """Set (``mode`` None: remove) the org's default (``workload`` ORG)
    or a workload's mode. Returns whether anything changed; the caller
    then bumps the org's generation (``bundle.touch``) in the same
    transaction, holding the org's lock (``policycheck.lock_org``)."""
    row = session.get(EnforcementMode, (org_id, workload))
    before = row.mode if row else None
    if before == mode:
        return False
    if mode is None:
        session.delete(row)
    elif row is None:
        session.add(EnforcementMode(org_id=org_id, workload=workload, mode=mode,
                                    changed_at=utcnow(), changed_by=who))
    else:
        row.mode, row.changed_at, row.changed_by = mode, utcnow(), who
    audit.record(session, org_id, who, "mode.set", snapshots.mode_target(workload),
                 before=snapshots.mode(workload, before), after=snapshots.mode(workload, mode))
    return True


def _modes(session: Session, org_id: str) -> dict[str, EnforcementMode]:
    return {r.workload: r for r in session.scalars(
        select(EnforcementMode).where(EnforcementMode.org_id == org_id))}


def bundle_key(session: Session, org_id: str) -> dict:
    """The bundle's ``enforcement`` key, or nothing when the org sets no
    mode at all (its workloads keep their own)."""
    modes = _modes(session, org_id)
    if not modes:
        return {}
    out: dict = {"workloads": {w: modes[w].mode for w in sorted(modes) if w != ORG}}
    if ORG in modes:
        out["default"] = modes[ORG].mode
    return {"enforcement": out}


def org_default(session: Session, org_id: str) -> dict:
    row = session.get(EnforcementMode, (org_id, ORG))
    return {"mode": row.mode if row else None,
            "changed_at": _iso(row.changed_at) if row else None,
            "changed_by": row.changed_by if row else None}


def denial_counts(session: Session, org_id: str,
                  now: dt.datetime | None = None) -> dict[str, dict[str, int]]:
    """Per workload: the connections denied and would-be denied in the
    flow rows last seen within the hour before ``now``."""
    since = (now or utcnow()) - COUNT_WINDOW
    out: dict[str, dict[str, int]] = {}
    for workload, verdict, n in session.execute(
            select(Flow.workload, Flow.verdict, func.sum(Flow.count))
            .where(Flow.org_id == org_id, *flows_seen_since(since),
                   Flow.verdict.in_(("denied", "would_deny")))
            .group_by(Flow.workload, Flow.verdict)):
        out.setdefault(workload, {"denied": 0, "would_deny": 0})[verdict] = int(n or 0)
    return out


def workload_views(session: Session, org_id: str, current_version: int | None) -> list[dict]:
    """Every workload that checked in or has a mode of its own, with the
    mode the server sets for it, where that comes from, what it last said
    it applies, its denials of the last hour, and the flow records it
    reported dropped."""
    modes = _modes(session, org_id)
    default = modes.get(ORG)
    seen = {w.name: w for w in session.scalars(
        select(Workload).where(Workload.org_id == org_id))}
    counts = denial_counts(session, org_id)
    out = []
    for name in sorted(set(seen) | (set(modes) - {ORG})):
        w, own = seen.get(name), modes.get(name)
        mode, source = ((own.mode, "workload") if own else
                        (default.mode, "org") if default else (None, None))
        c = counts.get(name, {})
        out.append({
            "name": name,
            "address": w.address if w else None,
            "enforcing_version": w.enforcing_version if w else None,
            "current": (w is not None and current_version is not None
                        and w.enforcing_version == current_version),
            "last_seen": _iso(w.last_seen) if w else None,
            "mode": mode, "mode_source": source,
            "mode_changed_at": _iso(own.changed_at) if own else None,
            "mode_changed_by": own.changed_by if own else None,
            "applied_mode": w.applied_mode if w else None,
            "denied_last_hour": c.get("denied", 0),
            "would_deny_last_hour": c.get("would_deny", 0),
            "flows_dropped": w.flows_dropped if w else 0,
            "flows_dropped_at": _iso(w.flows_dropped_at) if w else None,
        })
    return out


def _iso(t: dt.datetime | None) -> str | None:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else None
