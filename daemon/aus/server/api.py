"""The management API under ``/api/orgs/{org_id}/``: user groups (as the
directory pushed them, plus manual ones), IP lists and rules (the org's
draft, published by a provision: ``policyapi``), the policy version, the
bundle long-poll for ``ausd``, and the workloads that fetched it.

Authentication: the org's API key, as HTTP Basic (key as user, secret as
password) or as ``Bearer <key>:<secret>``, held to the scope each route
needs (:mod:`.access`). Errors are JSON::

    {"error": {"status": 422, "message": "...", "fields": [{"field": "destinations[1]", "message": "..."}]}}
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..core.bundle import DELTA_MEDIA_TYPE
from ..core.dnsname import is_dns_destination
from ..core.policy import (
    check_group_name,
    check_rule_name,
    dns_hint,
    name_key,
    normalize_sid,
    parse_destination,
    parse_service,
)
from . import (
    access,
    audit,
    enforcement,
    metrics,
    policycheck,
    policyversions,
    snapshots,
)
from .auth import AuthError
from .bundle import accepts_gzip, build_status, parse_if_none_match, touch
from .db import (
    Group,
    IpList,
    Membership,
    Rule,
    RuleSource,
    User,
    fold,
    utcnow,
)

API_PREFIX = "/api/orgs/{org_id}"
MAX_PAGE = 500
MAX_OFFSET = 2**62         # an OFFSET every engine takes
INT32_MAX = 2**31 - 1       # the enforcing_version column (INTEGER)


class ApiError(Exception):
    def __init__(self, status: int, message: str, fields: list[dict] | None = None):
        self.status = status
        self.message = message
        self.fields = fields or []
        super().__init__(message)


def _error_response(status: int, message: str, fields: list[dict] | None = None,
                    headers: dict | None = None, detail: str | None = None) -> JSONResponse:
    body: dict = {"error": {"status": status, "message": message, "fields": fields or []}}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def _verified_key(org_id: str, request: Request) -> str:
    """The id of the org's key making the request, held to the route's
    scope (:mod:`.access`), also left in ``request.state.key_id`` (a change
    records who made it)."""
    return access.authorize(request, org_id).id


def org_auth(org_id: str, request: Request) -> str:
    """The org the request may act on; AuthError otherwise."""
    _verified_key(org_id, request)
    return org_id


def org_key(org_id: str, request: Request) -> tuple[str, str]:
    """The org and the API key acting on it (a change records who made it)."""
    return org_id, _verified_key(org_id, request)


def _session(request: Request) -> Session:
    return request.app.state.sessions


# --------------------------------------------------------------------------
# Bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ManualGroupIn(_Body):
    display_name: str = Field(min_length=1, max_length=256)
    sid: str | None = None


class IpListIn(_Body):
    name: str
    entries: list[str]


class RuleIn(_Body):
    name: str
    description: str = ""
    sources: list[str]
    destinations: list[str]
    services: list[str]


# --------------------------------------------------------------------------
# Validation: every problem at once, each with its field.


def _check_name(name: str, field: str, what: str) -> list[dict]:
    """Rules and IP lists are named like the policy file's rules."""
    try:
        check_rule_name(name, what)
    except ValueError as exc:
        return [{"field": field, "message": str(exc)}]
    return []


@contextlib.contextmanager
def _refused_as(what: str) -> Iterator[None]:
    """A write-time policy check's refusal, as this API's error (the
    transaction it happened in has been rolled back)."""
    try:
        yield
    except policycheck.WriteRefused as exc:
        raise ApiError(exc.status, f"the {what} is not valid",
                       [{"field": exc.field, "message": exc.message}]) from None


def _validate_rule(s: Session, org_id: str, body: RuleIn) -> list[dict]:
    problems = _check_name(body.name, "name", "rule")
    if not body.sources:
        problems.append({"field": "sources", "message": "a rule needs at least one source user group"})
    known = set(s.scalars(select(Group.id).where(Group.org_id == org_id,
                                                 Group.id.in_(body.sources)))) if body.sources else set()
    seen: set[str] = set()
    for i, gid in enumerate(body.sources):
        if gid in seen:
            problems.append({"field": f"sources[{i}]", "message": f"user group {gid} is listed twice"})
        elif gid not in known:
            problems.append({"field": f"sources[{i}]",
                             "message": f"no user group with id {gid!r} in this org"})
        seen.add(gid)
    if not body.destinations:
        problems.append({"field": "destinations",
                         "message": "a rule needs at least one destination (use 0.0.0.0/0 and ::/0 for any)"})
    lists = set(s.scalars(select(IpList.name).where(IpList.org_id == org_id)))
    for i, dest in enumerate(body.destinations):
        if dest in lists:
            continue
        try:
            parse_destination(dest)
        except ValueError as exc:
            problems.append({"field": f"destinations[{i}]", "message": str(exc) if
                             is_dns_destination(dest) else f"{exc} (nor is it the name of "
                             f"an IP list){dns_hint(dest)}"})
    if not body.services:
        problems.append({"field": "services", "message": "a rule needs at least one service (or 'any')"})
    for i, svc in enumerate(body.services):
        try:
            parse_service(svc)
        except ValueError as exc:
            problems.append({"field": f"services[{i}]", "message": str(exc)})
    return problems


def _validate_ip_list(body: IpListIn) -> list[dict]:
    problems = _check_name(body.name, "name", "IP list")
    if not problems:
        try:
            policycheck.ip_list_name(body.name)
        except policycheck.WriteRefused as exc:
            problems.append({"field": exc.field, "message": exc.message})
    if not body.entries:
        problems.append({"field": "entries",
                         "message": "an IP list needs at least one address, CIDR or dns: name"})
    for i, entry in enumerate(body.entries):
        try:
            parse_destination(entry)
        except ValueError as exc:
            problems.append({"field": f"entries[{i}]", "message": f"{exc}{dns_hint(entry)}"})
    return problems


# --------------------------------------------------------------------------
# Views


def _iso(t) -> str | None:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def _rules_using(s: Session, group_ids: list[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {g: [] for g in group_ids}
    if not group_ids:
        return out
    rows = s.execute(select(RuleSource.group_id, Rule.id, Rule.name)
                     .join(Rule, Rule.id == RuleSource.rule_id)
                     .where(RuleSource.group_id.in_(group_ids)).order_by(Rule.name)).all()
    for gid, rid, name in rows:
        out[gid].append({"id": rid, "name": name})
    return out


def _group_view(g: Group, member_count: int, nested: dict, rules: list[dict]) -> dict:
    return {
        "id": g.id,
        "display_name": g.display_name,
        "external_id": g.external_id,
        "sid": g.sid,
        "source": g.source,
        "created_at": _iso(g.created_at),
        "last_sync": {"at": _iso(g.last_sync_at), "operation": g.last_sync_op,
                      "outcome": g.last_sync_outcome},
        "member_count": member_count,
        "nested": nested,
        "rules": rules,
    }


def _nesting(s: Session, group_ids: list[str]) -> dict[str, dict]:
    """Per group: how many of its members are groups, and which groups it
    is a member of. Entra pushes only immediate members; nesting is shown,
    never expanded."""
    out = {g: {"member_groups": 0, "member_of": []} for g in group_ids}
    if not group_ids:
        return out
    for gid, n in s.execute(select(Membership.group_id, func.count())
                            .where(Membership.group_id.in_(group_ids),
                                   Membership.member_type == "Group")
                            .group_by(Membership.group_id)):
        out[gid]["member_groups"] = n
    for child, parent, name in s.execute(
            select(Membership.member_id, Group.id, Group.display_name)
            .join(Group, Group.id == Membership.group_id)
            .where(Membership.member_id.in_(group_ids), Membership.member_type == "Group")):
        out[child]["member_of"].append({"id": parent, "display_name": name})
    return out


def _member_counts(s: Session, group_ids: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(group_ids, 0)
    if group_ids:
        counts.update(dict(s.execute(select(Membership.group_id, func.count())
                                     .where(Membership.group_id.in_(group_ids))
                                     .group_by(Membership.group_id)).all()))
    return counts


def _like(q: str) -> str:
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _rule_view(r: Rule, sources: list[str], groups: dict[str, str]) -> dict:
    return {
        "id": r.id, "name": r.name, "description": r.description,
        "sources": [{"id": g, "display_name": groups.get(g)} for g in sources],
        "missing_sources": [g for g in sources if g not in groups],
        "destinations": list(r.destinations), "services": list(r.services),
        "created_at": _iso(r.created_at), "modified_at": _iso(r.modified_at),
    }


def _rules_view(s: Session, org_id: str, rules: list[Rule]) -> list[dict]:
    ids = [r.id for r in rules]
    src: dict[str, list[str]] = {i: [] for i in ids}
    if ids:
        for rid, gid in s.execute(select(RuleSource.rule_id, RuleSource.group_id)
                                  .where(RuleSource.rule_id.in_(ids)).order_by(RuleSource.position)):
            src[rid].append(gid)
    wanted = {g for v in src.values() for g in v}
    names = dict(s.execute(select(Group.id, Group.display_name)
                           .where(Group.org_id == org_id, Group.id.in_(wanted))).all()) if wanted else {}
    return [_rule_view(r, src[r.id], names) for r in rules]


# --------------------------------------------------------------------------
# Routes

router = APIRouter(prefix=API_PREFIX, tags=["management"])


@router.get("/whoami")
def whoami(org_id: str = Depends(org_auth)) -> dict:
    return {"org": org_id}


@router.get("/groups")
def list_groups(request: Request, org_id: str = Depends(org_auth),
                q: str = Query("", max_length=1024, description="substring of the name, id, external id or SID"),
                source: str | None = Query(None, pattern="^(scim|manual)$"),
                offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(50, ge=1, le=MAX_PAGE)) -> dict:
    with _session(request)() as s:
        where = [Group.org_id == org_id]
        if q.strip():
            pat = _like(fold(q.strip()))
            where.append(or_(Group.display_name_key.like(pat, escape="\\"),
                             func.lower(Group.id).like(pat, escape="\\"),
                             func.lower(func.coalesce(Group.external_id, "")).like(pat, escape="\\"),
                             func.lower(func.coalesce(Group.sid, "")).like(pat, escape="\\")))
        if source:
            where.append(Group.source == source)
        total = s.scalar(select(func.count()).select_from(Group).where(*where))
        groups = s.scalars(select(Group).where(*where).order_by(Group.display_name_key, Group.id)
                           .offset(offset).limit(limit)).all()
        ids = [g.id for g in groups]
        counts, nesting, rules = _member_counts(s, ids), _nesting(s, ids), _rules_using(s, ids)
        items = [_group_view(g, counts[g.id], nesting[g.id], rules[g.id]) for g in groups]
    return {"total": total, "offset": offset, "limit": limit, "items": items}


@router.get("/groups/{group_id}")
def get_group(group_id: str, request: Request, org_id: str = Depends(org_auth),
              offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(100, ge=1, le=MAX_PAGE)) -> dict:
    with _session(request)() as s:
        g = s.scalar(select(Group).where(Group.org_id == org_id, Group.id == group_id))
        if g is None:
            raise ApiError(404, f"no user group with id {group_id!r} in this org")
        count = _member_counts(s, [g.id])[g.id]
        view = _group_view(g, count, _nesting(s, [g.id])[g.id], _rules_using(s, [g.id])[g.id])
        rows = s.execute(
            select(Membership.member_id, Membership.member_type, User.user_name, User.active,
                   Group.display_name.label("group_name"))
            .select_from(Membership)
            .outerjoin(User, (User.id == Membership.member_id) & (Membership.member_type == "User"))
            .outerjoin(Group, (Group.id == Membership.member_id) & (Membership.member_type == "Group"))
            .where(Membership.group_id == g.id)
            .order_by(Membership.member_type.desc(), func.coalesce(User.user_name_key, Group.display_name_key))
            .offset(offset).limit(limit)).all()
    view["members"] = {
        "total": count, "offset": offset, "limit": limit,
        "items": [{"id": mid, "type": mtype,
                   "name": uname if mtype == "User" else gname,
                   **({"active": bool(active)} if mtype == "User" else {})}
                  for mid, mtype, uname, active, gname in rows],
    }
    if view["nested"]["member_groups"] or view["nested"]["member_of"]:
        view["warning"] = ("nested groups: Entra ID provisions only immediate members, so members "
                           "of a nested group get no rules through this group")
    return view


@router.post("/groups", status_code=201)
def create_manual_group(body: ManualGroupIn, request: Request,
                        org_id: str = Depends(org_auth)) -> dict:
    problems = []
    try:
        check_group_name(body.display_name)
    except ValueError as exc:
        problems.append({"field": "display_name", "message": str(exc)})
    sid = None
    if body.sid is not None and body.sid.strip():
        try:
            sid = normalize_sid(body.sid)
        except ValueError as exc:
            problems.append({"field": "sid", "message": str(exc)})
    if problems:
        raise ApiError(422, "the user group is not valid", problems)
    now = utcnow()
    try:
        with _refused_as("user group"), _session(request).begin() as s:
            g = Group(id=str(uuid.uuid4()), org_id=org_id, display_name=body.display_name,
                      display_name_key=fold(body.display_name), sid=sid, source="manual", doc={},
                      created_at=now, modified_at=now, last_sync_at=None)
            s.add(g)
            s.flush()
            touch(s, org_id)
            policycheck.group_ids(s, org_id, g.id, sid=sid)
            audit.record(s, org_id, request.state.key_id, "group.create", g.id,
                         after=snapshots.group(s, g))
            view = _group_view(g, 0, {"member_groups": 0, "member_of": []}, [])
    except IntegrityError:
        raise ApiError(409, "the user group is not valid", [{
            "field": "display_name",
            "message": f"a user group named {body.display_name!r} exists already (names compare case-insensitively)"}]) from None
    request.app.state.bundles.poke()
    return view


@router.delete("/groups/{group_id}", status_code=204)
def delete_manual_group(group_id: str, request: Request, org_id: str = Depends(org_auth)) -> Response:
    with _session(request).begin() as s:
        policycheck.lock_org(s, org_id)   # queued: the audit's before is what this write found
        g = s.scalar(select(Group).where(Group.org_id == org_id, Group.id == group_id))
        if g is None:
            raise ApiError(404, f"no user group with id {group_id!r} in this org")
        if g.source != "manual":
            raise ApiError(409, "this group is provisioned by the directory over SCIM; "
                                "remove it there (or unassign it from the provisioning app)")
        audit.record(s, org_id, request.state.key_id, "group.delete", g.id,
                     before=snapshots.group(s, g))
        s.delete(g)
        touch(s, org_id)
    request.app.state.bundles.rebuild_now(org_id)
    return Response(status_code=204)


@router.get("/ip-lists")
def list_ip_lists(request: Request, org_id: str = Depends(org_auth)) -> dict:
    with _session(request)() as s:
        rows = s.scalars(select(IpList).where(IpList.org_id == org_id).order_by(IpList.name)).all()
        return {"items": [{"id": l.id, "name": l.name, "entries": l.entries} for l in rows]}


def _save_ip_list(request: Request, org_id: str, body: IpListIn, list_id: str | None) -> dict:
    problems = _validate_ip_list(body)
    if problems:
        raise ApiError(422, "the IP list is not valid", problems)
    try:
        with _session(request).begin() as s:
            policycheck.lock_org(s, org_id)   # queued: the audit's before is what this write found
            key_id = request.state.key_id
            before = None
            if list_id is None:
                row = IpList(id=str(uuid.uuid4()), org_id=org_id)
                s.add(row)
            else:
                row = s.scalar(select(IpList).where(IpList.org_id == org_id, IpList.id == list_id))
                if row is None:
                    raise ApiError(404, f"no IP list with id {list_id!r} in this org")
                before = snapshots.ip_list(row)
                if row.name != body.name:
                    _rename_destination(s, org_id, row.name, body.name, key_id)
            row.name, row.entries, row.modified_at = body.name, list(body.entries), utcnow()
            s.flush()
            touch(s, org_id)
            after = snapshots.ip_list(row)
            if after != before:   # an unchanged PUT is no change
                audit.record(s, org_id, key_id, "ip_list.update" if before else "ip_list.create",
                             row.id, before=before, after=after)
            out = {"id": row.id, "name": row.name, "entries": row.entries}
    except IntegrityError:
        raise ApiError(409, "the IP list is not valid", [
            {"field": "name", "message": f"an IP list named {body.name!r} exists already"}]) from None
    out.update(_draft_reply(request, org_id))
    return out


def _rename_destination(s: Session, org_id: str, old: str, new: str, key_id: str) -> None:
    """Rules naming IP list ``old`` name ``new`` instead (each one a change
    of its own in the audit trail)."""
    for rule in s.scalars(select(Rule).where(Rule.org_id == org_id)).all():
        if old in rule.destinations:
            before = snapshots.rule(s, org_id, rule)
            rule.destinations = [new if d == old else d for d in rule.destinations]
            audit.record(s, org_id, key_id, "rule.update", rule.id, before=before,
                         after=snapshots.rule(s, org_id, rule))


def _draft_reply(request: Request, org_id: str) -> dict:
    """What a rule or IP-list write answers besides the row: the change is
    in the draft; ``policy_version`` is still the version in force."""
    cur = request.app.state.bundles.current(org_id)
    return {"draft": True, "policy_version": cur.version if cur else 0}


@router.post("/ip-lists", status_code=201)
def create_ip_list(body: IpListIn, request: Request, org_id: str = Depends(org_auth)) -> dict:
    return _save_ip_list(request, org_id, body, None)


@router.put("/ip-lists/{list_id}")
def update_ip_list(list_id: str, body: IpListIn, request: Request,
                   org_id: str = Depends(org_auth)) -> dict:
    return _save_ip_list(request, org_id, body, list_id)


@router.delete("/ip-lists/{list_id}", status_code=204)
def delete_ip_list(list_id: str, request: Request, org_id: str = Depends(org_auth)) -> Response:
    with _session(request).begin() as s:
        policycheck.lock_org(s, org_id)   # no rule may start using it meanwhile
        row = s.scalar(select(IpList).where(IpList.org_id == org_id, IpList.id == list_id))
        if row is None:
            raise ApiError(404, f"no IP list with id {list_id!r} in this org")
        users = [r.name for r in s.scalars(select(Rule).where(Rule.org_id == org_id))
                 if row.name in r.destinations]
        if users:
            raise ApiError(409, f"IP list {row.name!r} is used by rules {', '.join(sorted(users))}; "
                                "change those first")
        audit.record(s, org_id, request.state.key_id, "ip_list.delete", row.id,
                     before=snapshots.ip_list(row))
        s.delete(row)
        touch(s, org_id)
    return Response(status_code=204)


@router.get("/rules")
def list_rules(request: Request, org_id: str = Depends(org_auth)) -> dict:
    with _session(request)() as s:
        rules = s.scalars(select(Rule).where(Rule.org_id == org_id)
                          .order_by(Rule.position, Rule.name)).all()
        items = _rules_view(s, org_id, rules)
    cur = request.app.state.bundles.current(org_id)
    return {"items": items, "policy_version": cur.version if cur else 0}


@router.get("/rules/{rule_id}")
def get_rule(rule_id: str, request: Request, org_id: str = Depends(org_auth)) -> dict:
    with _session(request)() as s:
        rule = s.scalar(select(Rule).where(Rule.org_id == org_id, Rule.id == rule_id))
        if rule is None:
            raise ApiError(404, f"no rule with id {rule_id!r} in this org")
        return _rules_view(s, org_id, [rule])[0]


def _save_rule(request: Request, org_id: str, body: RuleIn, rule_id: str | None) -> dict:
    now = utcnow()
    try:
        with _refused_as("rule"), _session(request).begin() as s:
            policycheck.lock_org(s, org_id)   # queued: the audit's before is what this write found
            problems = _validate_rule(s, org_id, body)
            if problems:
                raise ApiError(422, "the rule is not valid", problems)
            before = None
            if rule_id is None:
                last = s.scalar(select(func.max(Rule.position)).where(Rule.org_id == org_id))
                rule = Rule(id=str(uuid.uuid4()), org_id=org_id, created_at=now,
                            position=(last or 0) + 1)
                s.add(rule)
            else:
                rule = s.scalar(select(Rule).where(Rule.org_id == org_id, Rule.id == rule_id))
                if rule is None:
                    raise ApiError(404, f"no rule with id {rule_id!r} in this org")
                before = snapshots.rule(s, org_id, rule)
                s.execute(delete(RuleSource).where(RuleSource.rule_id == rule.id))
            renamed = rule.name_key != name_key(body.name)
            rule.name, rule.description = body.name, body.description
            rule.destinations, rule.services = list(body.destinations), list(body.services)
            rule.modified_at = now
            s.flush()
            for i, gid in enumerate(body.sources):
                s.add(RuleSource(rule_id=rule.id, group_id=gid, position=i))
            touch(s, org_id)
            if renamed:
                policycheck.rule_name(s, org_id, rule.id, body.name)
            policycheck.rule_destinations(s, org_id, body.destinations)
            s.flush()
            after = snapshots.rule(s, org_id, rule)
            if after != before:   # an unchanged PUT is no change
                audit.record(s, org_id, request.state.key_id,
                             "rule.update" if before else "rule.create", rule.id,
                             before=before, after=after)
            view = _rules_view(s, org_id, [rule])[0]
    except IntegrityError:
        raise ApiError(409, "the rule is not valid", [
            {"field": "name", "message": f"a rule named {body.name!r} exists already"}]) from None
    view.update(_draft_reply(request, org_id))
    return view


@router.post("/rules", status_code=201)
def create_rule(body: RuleIn, request: Request, org_id: str = Depends(org_auth)) -> dict:
    return _save_rule(request, org_id, body, None)


@router.put("/rules/{rule_id}")
def update_rule(rule_id: str, body: RuleIn, request: Request,
                org_id: str = Depends(org_auth)) -> dict:
    return _save_rule(request, org_id, body, rule_id)


@router.delete("/rules/{rule_id}")
def delete_rule(rule_id: str, request: Request, org_id: str = Depends(org_auth)) -> dict:
    with _session(request).begin() as s:
        policycheck.lock_org(s, org_id)   # queued: the audit's before is what this write found
        rule = s.scalar(select(Rule).where(Rule.org_id == org_id, Rule.id == rule_id))
        if rule is None:
            raise ApiError(404, f"no rule with id {rule_id!r} in this org")
        audit.record(s, org_id, request.state.key_id, "rule.delete", rule.id,
                     before=snapshots.rule(s, org_id, rule))
        s.delete(rule)
        touch(s, org_id)
    return {"deleted": rule_id, **_draft_reply(request, org_id)}


@router.get("/policy")
def policy_version(request: Request, org_id: str = Depends(org_auth)) -> dict:
    """The version in force, and how the last build of the org's policy
    went (``build``): when it failed, what workloads get meanwhile."""
    cur = request.app.state.bundles.current(org_id)
    with _session(request)() as s:
        build = build_status(s, org_id)
        draft = {"pending": policyversions.pending(s, org_id)}
    if cur is None:
        return {"version": 0, "etag": None, "build": build, "draft": draft}
    return {"version": cur.version, "etag": cur.etag, "build": build, "draft": draft}


@router.get("/workloads")
def list_workloads(request: Request, org_id: str = Depends(org_auth)) -> dict:
    """Each workload with its mode (``mode_source``: ``workload`` or
    ``org``), the mode it says it applies, and its denials of the last hour."""
    cur = request.app.state.bundles.current(org_id)
    with _session(request)() as s:
        items = enforcement.workload_views(s, org_id, cur.version if cur else None)
        default = enforcement.org_default(s, org_id)
    return {"policy_version": cur.version if cur else 0, "default_mode": default["mode"],
            "items": items}


# -- the enforcement mode ------------------------------------------------------


def _key_of(org_id: str, request: Request) -> str:
    """The id of the org's key making the request (recorded with a change)."""
    return _verified_key(org_id, request)


def _set_mode(request: Request, org_id: str, key_id: str, workload: str, body) -> bool:
    try:
        if workload != enforcement.ORG:
            enforcement.check_workload_name(workload)
        mode = enforcement.parse_mode_body(body, allow_null=workload != enforcement.ORG)
    except enforcement.ModeRefused as exc:
        raise ApiError(400, "the mode is not valid",
                       [{"field": exc.field, "message": exc.message}]) from None
    with _session(request).begin() as s:
        policycheck.lock_org(s, org_id)   # concurrent first settings of one name queue here
        changed = enforcement.set_mode(s, org_id, workload, mode, key_id)
        if changed:
            touch(s, org_id)
    return changed


@router.get("/mode")
def get_org_mode(request: Request, org_id: str = Depends(org_auth)) -> dict:
    """The org's default mode (null: none set; workloads keep their own)."""
    with _session(request)() as s:
        return enforcement.org_default(s, org_id)


@router.put("/mode")
def put_org_mode(request: Request, org_id: str, body=Body(None),
                 key_id: str = Depends(_key_of)) -> dict:
    changed = _set_mode(request, org_id, key_id, enforcement.ORG, body)
    version = request.app.state.bundles.rebuild_now(org_id)
    with _session(request)() as s:
        return {**enforcement.org_default(s, org_id), "changed": changed,
                "policy_version": version}


@router.put("/workloads/{name}/mode")
def put_workload_mode(name: str, request: Request, org_id: str, body=Body(None),
                      key_id: str = Depends(_key_of)) -> dict:
    changed = _set_mode(request, org_id, key_id, name, body)
    version = request.app.state.bundles.rebuild_now(org_id)
    with _session(request)() as s:
        views = {w["name"]: w for w in enforcement.workload_views(s, org_id, version)}
        # a workload never seen, returned to the default, is listed nowhere
        default = enforcement.org_default(s, org_id)["mode"]
        view = views.get(name) or {"name": name, "mode": default,
                                   "mode_source": "org" if default else None}
    return {**view, "changed": changed, "policy_version": version}


# -- the bundle --------------------------------------------------------------


def _note_workload(request: Request, org_id: str, name: str, version: int, address: str,
                   mode: str | None) -> None:
    """Queue the workload's check-in; the bundle service writes them in
    batches, so a thousand polls never wait on a thousand writes."""
    request.app.state.bundles.note_workload(org_id, name, version, address, mode)


@router.get("/bundle", responses={304: {"description": "unchanged during the wait"}})
async def get_bundle(request: Request, org_id: str, wait: float = Query(0, ge=0, le=3600),
                     since: int | None = Query(None, ge=0, le=INT32_MAX),
                     if_none_match: str | None = Header(None),
                     accept_encoding: str | None = Header(None),
                     x_aus_workload: str | None = Header(None),
                     x_aus_enforcing: int | None = Header(None, ge=0, le=INT32_MAX),
                     x_aus_mode: str | None = Header(None)) -> Response:
    await access.authorize_async(request, org_id)
    if x_aus_workload:
        address = request.client.host if request.client else ""
        mode = x_aus_mode if x_aus_mode in enforcement.MODES else None   # an older ausd: none
        _note_workload(request, org_id, x_aus_workload[:255], x_aus_enforcing or 0, address, mode)
    bundles = request.app.state.bundles
    etag = parse_if_none_match(if_none_match)
    cur = await bundles.wait_change(org_id, etag, wait)
    if cur is None:
        now = bundles.current(org_id)
        if now is None:
            raise ApiError(404, f"org {org_id!r} has no policy bundle yet")
        return Response(status_code=304, headers={"ETag": now.etag})
    gz = accepts_gzip(accept_encoding)
    headers = {"ETag": cur.etag, "X-Aus-Version": str(cur.version), "Cache-Control": "no-cache",
               "Vary": "Accept-Encoding"}
    if gz:
        headers["Content-Encoding"] = "gzip"
    # A daemon naming the version it holds gets only the changes, when
    # they reach from there and are smaller; else the whole bundle.
    delta = await bundles.delta(org_id, since, cur) if since is not None else None
    if delta is not None:
        headers["X-Aus-Delta-From"] = str(delta.from_version)
        kind, body, media = "delta", delta.gzip if gz else delta.body, DELTA_MEDIA_TYPE
    else:
        kind, body, media = "full", cur.gzip if gz else cur.body, "application/json"
    metrics.BUNDLE_ANSWERS.labels(kind, "gzip" if gz else "identity").inc()
    metrics.BUNDLE_BYTES.labels(kind).inc(len(body))
    return Response(body, media_type=media, headers=headers)


def whoami_any(request: Request) -> dict:
    """The org a key belongs to, and its scopes: the console signs in with
    the key alone."""
    key = access.authorize(request, None)
    return {"org": key.org_id, "key": key.id, "scopes": list(key.scopes)}


def install(app: FastAPI) -> None:
    app.add_api_route("/api/whoami", whoami_any, methods=["GET"], tags=["management"])

    def is_api(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return _error_response(exc.status, exc.message, exc.fields)

    previous_auth = app.exception_handlers.get(AuthError)

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, exc: AuthError):
        if not is_api(request) and previous_auth is not None:
            return await previous_auth(request, exc)
        headers = {"WWW-Authenticate": 'Basic realm="aus-server"'} if exc.status == 401 else None
        if exc.retry_after is not None:
            headers = {"Retry-After": str(exc.retry_after)}
        return _error_response(exc.status, str(exc), headers=headers,
                               detail=getattr(exc, "detail", None))

    previous_validation = app.exception_handlers.get(RequestValidationError)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        if not is_api(request) and previous_validation is not None:
            return await previous_validation(request, exc)
        fields = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
            field = ""
            for part in loc:
                field += f"[{part}]" if part.isdigit() else (("." if field else "") + part)
            fields.append({"field": field or "body", "message": err.get("msg", "invalid")})
        return _error_response(422, "the request is not valid", fields)

    app.include_router(router)
