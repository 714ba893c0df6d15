"""``GET /api/orgs/{org_id}/audit``: the org's audit trail, newest first,
filtered and paged by key like ``GET traffic`` (the cursor is the last
event's id, so events recorded while a client pages never shift a page).
The contract is in docs/audit.md."""

from __future__ import annotations

import hashlib
import json
import re

from fastapi import APIRouter, Depends, Request
from sqlalchemy import or_, select

from ..core.flowrecord import iso
from .api import API_PREFIX, org_auth
from .db import AuditEvent
from .traffic import (
    _bad,
    _decode_cursor,
    _encode_cursor,
    _limit,
    _single,
    _text,
    _time,
    _utc,
)

PARAMS = ("action", "target", "key_id", "since", "until", "limit", "cursor")
# An action ("rule.update") or every action on one kind of object ("rule.*").
_ACTION = re.compile(r"[a-z_]+(\.[a-z_]+|\.\*)?")
MAX_ACTIONS = 32

router = APIRouter(prefix=API_PREFIX, tags=["audit"])

_DOC = {
    "action": 'actions, comma-separated: exact ("rule.update"), a kind ("rule.*"); default all',
    "target": ("what changed, exactly: a rule's, IP list's or group's id, "
               '"version 7", "draft", "org" (the default mode), "workload:NAME"'),
    "key_id": "the API key that made the change, exactly (cli: the aus-server command)",
    "since": "ISO 8601 time with a zone: events at or after it",
    "until": "ISO 8601 time with a zone: events at or before it",
    "limit": "1-1000, default 100", "cursor": "the previous page's next",
}
_OPENAPI = {"parameters": [{"name": n, "in": "query", "required": False, "description": _DOC[n],
                            "schema": {"type": "string"}} for n in PARAMS]}


def _actions(raw: str) -> list[str]:
    actions = [a.strip() for a in raw.split(",") if a.strip()]
    if not actions:
        raise _bad("action", 'expected one or more actions such as "rule.update" or "rule.*"')
    if len(actions) > MAX_ACTIONS:
        raise _bad("action", f"more than {MAX_ACTIONS} actions")
    for a in actions:
        if not _ACTION.fullmatch(a):
            raise _bad("action", f'{a[:80]!r} is not an action such as "rule.update" or "rule.*"')
    return sorted(set(actions))


def _action_condition(actions: list[str]):
    exact = [a for a in actions if not a.endswith(".*")]
    kinds = [a[:-1] for a in actions if a.endswith(".*")]   # "rule."
    conds = [AuditEvent.action.in_(exact)] if exact else []
    # A kind's prefix is letters, "_" and a dot; "_" is a LIKE wildcard.
    conds += [AuditEvent.action.like(k.replace("_", "\\_") + "%", escape="\\") for k in kinds]
    return or_(*conds)


def item(e: AuditEvent) -> dict:
    return {"id": e.id, "at": iso(_utc(e.at)), "key_id": e.key_id, "key_label": e.key_label,
            "action": e.action, "target": e.target, "before": e.before, "after": e.after}


@router.get("/audit", openapi_extra=_OPENAPI)
def list_audit(request: Request, org_id: str = Depends(org_auth)) -> dict:
    """The org's changes newest first; ``next`` continues after the last one."""
    params = _single(request, PARAMS)
    where = [AuditEvent.org_id == org_id]
    actions = _actions(params["action"]) if "action" in params else None
    if actions is not None:
        where.append(_action_condition(actions))
    for name, column in (("target", AuditEvent.target), ("key_id", AuditEvent.key_id)):
        if name in params:
            where.append(column == _text(name, params[name]))
    since = _time("since", params["since"]) if "since" in params else None
    until = _time("until", params["until"]) if "until" in params else None
    if since is not None and until is not None and until < since:
        raise _bad("until", "is before since")
    if since is not None:
        where.append(AuditEvent.at >= since)
    if until is not None:
        where.append(AuditEvent.at <= until)
    limit = _limit(params)
    fp = hashlib.sha256(json.dumps([actions, params.get("target"), params.get("key_id"),
                                    since and since.isoformat(), until and until.isoformat()])
                        .encode()).hexdigest()[:16]
    if "cursor" in params:
        cur = _decode_cursor(params["cursor"], fp)
        last = cur.get("i")
        if not isinstance(last, int) or isinstance(last, bool):
            raise _bad("cursor", "not a cursor this API returned")
        where.append(AuditEvent.id < last)
    with request.app.state.sessions() as s:
        rows = s.scalars(select(AuditEvent).where(*where)
                         .order_by(AuditEvent.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = _encode_cursor({"i": rows[-1].id, "f": fp}) if more else None
    return {"items": [item(e) for e in rows], "next": nxt}


def install(app) -> None:
    app.include_router(router)
