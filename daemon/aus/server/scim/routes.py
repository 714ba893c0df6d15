"""SCIM 2.0 endpoints under ``/scim/orgs/{org_id}/``, as Microsoft Entra
ID's provisioning service calls them (Tenant URL
``https://<server>/scim/orgs/<org_id>/``, ``Authorization: Bearer
<api_key>:<secret>``).

Handlers that touch the database are plain ``def`` (FastAPI runs them in
its thread pool). Each write is one transaction that ends with
``bundle.touch`` (the org row is locked last); the bundle service is
poked after commit. A failed operation on a group is noted on the group
(``last_sync_*``) in a transaction of its own, after the rollback.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response

from .. import access, policycheck
from ..auth import AuthError
from ..bundle import touch
from . import discovery, store
from .errors import (
    INVALID_SYNTAX,
    UNIQUENESS,
    ScimError,
    ScimResponse,
    ScimRoute,
    bad_request,
    not_found,
)
from .filter import parse_filter
from .patch import apply as apply_patch
from .patch import member_ops, member_values, normalize, summary
from .resources import (
    GROUP,
    LIST_RESPONSE,
    USER,
    Kind,
    Projection,
    accept,
    etag,
    group_columns,
    render,
)

router = APIRouter(prefix="/scim/orgs/{org_id}", route_class=ScimRoute)
fallback = APIRouter(route_class=ScimRoute)
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


# --------------------------------------------------------------------------
# Request plumbing


@dataclass
class Ctx:
    request: Request
    org: str
    base: str                      # the tenant URL, for meta.location and $ref
    sessions: sessionmaker
    params: dict[str, str]         # query parameters, names casefolded

    def poke(self) -> None:
        self.request.app.state.bundles.poke()

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads: on SQLite a read-only transaction (no write
        lock: lookups run beside writes, WAL); on PostgreSQL autocommit
        statements (no BEGIN/ROLLBACK round trips)."""
        with self.sessions() as s:
            s.connection(execution_options=self.request.app.state.scim_read_options)
            yield s

    @contextlib.contextmanager
    def writing(self) -> Iterator[Session]:
        """One write transaction (on SQLite, writers queue in the engine:
        aus.server.db.make_engine)."""
        with self.sessions.begin() as s:
            yield s


def _ctx(request: Request, org_id: str) -> Ctx:
    try:
        access.authorize(request, org_id, scim=True)
    except AuthError as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="aus-server"'} if exc.status == 401 else None
        if exc.retry_after is not None:
            headers = {"Retry-After": str(exc.retry_after)}
        raise ScimError(exc.status, str(exc), headers=headers) from None
    base = f"{str(request.base_url).rstrip('/')}/scim/orgs/{org_id}"
    params = {k.casefold(): v for k, v in request.query_params.items()}
    return Ctx(request, org_id, base, request.app.state.sessions, params)


async def read_body(request: Request) -> bytes:
    """The request body, refused past :data:`discovery.MAX_PAYLOAD`."""
    limit = discovery.MAX_PAYLOAD
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ScimError(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ScimError(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes) -> Any:
    if not body.strip():
        raise bad_request("the request has no body", INVALID_SYNTAX)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise bad_request(f"malformed JSON: {exc}", INVALID_SYNTAX) from None


_INTEGER = re.compile(r"-?[0-9]+")
MAX_START = 2**62          # an OFFSET every engine takes


def _int_param(ctx: Ctx, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter, clamped to ``lo..hi`` as RFC 7644 §3.4.2.4
    has it for startIndex and count; only ASCII digits with an optional
    minus, so ``1e30``, ``+1`` or ``١`` are refused, not guessed at."""
    raw = ctx.params.get(name.casefold())
    if raw is None or raw == "":
        return default
    if not _INTEGER.fullmatch(raw):
        raise bad_request(f"{name} must be an integer, not {raw[:40]!r}")
    if len(raw.lstrip("-")) > 18:             # clamp without converting 4,000 digits
        return lo if raw.startswith("-") else hi
    return min(max(lo, int(raw)), hi)


def _projection(ctx: Ctx, kind: Kind) -> Projection:
    return Projection(kind, ctx.params.get("attributes"), ctx.params.get("excludedattributes"))


def _check_if_match(ctx: Ctx, version: int) -> None:
    """If-Match (RFC 7644 §3.14): the write applies only to this version."""
    header = ctx.request.headers.get("if-match")
    if not header or header.strip() == "*":
        return
    current = etag(version).removeprefix("W/")
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    if current not in tags:
        raise ScimError(412, f"the resource is at version {etag(version)}, not {header.strip()}")


def _member_view(ctx: Ctx, mid: str, mtype: str, display: str | None) -> dict:
    out = {"value": mid, "type": mtype,
           "$ref": f"{ctx.base}/{'Users' if mtype == 'User' else 'Groups'}/{mid}"}
    if display is not None:
        out["display"] = display
    return out


def _views(s, ctx: Ctx, kind: Kind, rows: list, proj: Projection) -> list[dict]:
    """Rows as SCIM resources; members/groups loaded only when shown, for
    the whole page in one query."""
    members = groups = None
    ids = [r.id for r in rows]
    if kind is GROUP and ids and proj.wants("members"):
        members = store.members_of(s, ids)
    if kind is USER and ids and proj.wants("groups"):
        groups = store.groups_of(s, ctx.org, ids)
    out = []
    for r in rows:
        m = [_member_view(ctx, *t) for t in members[r.id]] if members is not None else None
        g = [{"value": gid, "display": name, "type": "direct",
              "$ref": f"{ctx.base}/Groups/{gid}"} for gid, name in groups[r.id]] \
            if groups is not None else None
        out.append(proj.apply(render(kind, r, ctx.base, members=m, groups=g)))
    return out


def _view(s, ctx: Ctx, kind: Kind, row, proj: Projection) -> dict:
    return _views(s, ctx, kind, [row], proj)[0]


def _resource_response(ctx: Ctx, kind: Kind, row, view: dict, status: int = 200,
                       location: bool = False) -> Response:
    """The ETag and Location come from the row: ``attributes`` may have
    projected ``meta`` away from the body."""
    headers = {"ETag": etag(row.version)}
    if location:
        headers["Location"] = f"{ctx.base}/{'Users' if kind is USER else 'Groups'}/{row.id}"
    return ScimResponse(view, status_code=status, headers=headers)


def _list_response(resources: list[dict], total: int, start: int) -> Response:
    return ScimResponse({"schemas": [LIST_RESPONSE], "totalResults": total,
                         "startIndex": start, "itemsPerPage": len(resources),
                         "Resources": resources})


# --------------------------------------------------------------------------
# Reads


def _list(request: Request, org_id: str, kind: Kind) -> Response:
    ctx = _ctx(request, org_id)
    text = ctx.params.get("filter")
    node = parse_filter(text) if text is not None else None
    start = _int_param(ctx, "startIndex", 1, 1, MAX_START)
    count = _int_param(ctx, "count", discovery.DEFAULT_PAGE, 0, discovery.MAX_PAGE)
    proj = _projection(ctx, kind)
    with ctx.reading() as s:
        total, rows = store.search(s, kind, ctx.org, node, start, count)
        resources = _views(s, ctx, kind, rows, proj)
    return _list_response(resources, total, start)


def _get(request: Request, org_id: str, kind: Kind, rid: str) -> Response:
    ctx = _ctx(request, org_id)
    proj = _projection(ctx, kind)
    with ctx.reading() as s:
        row = (store.get_user if kind is USER else store.get_group)(s, ctx.org, rid)
        inm = request.headers.get("if-none-match")
        if inm and etag(row.version).removeprefix("W/") in [
                t.strip().removeprefix("W/") for t in inm.split(",")]:
            return Response(status_code=304, headers={"ETag": etag(row.version)})
        view = _views(s, ctx, kind, [row], proj)[0]
    return _resource_response(ctx, kind, row, view)


@router.get("/Users")
def list_users(request: Request, org_id: str) -> Response:
    return _list(request, org_id, USER)


@router.get("/Users/{user_id}")
def get_user(request: Request, org_id: str, user_id: str) -> Response:
    return _get(request, org_id, USER, user_id)


@router.get("/Groups")
def list_groups(request: Request, org_id: str) -> Response:
    return _list(request, org_id, GROUP)


@router.get("/Groups/{group_id}")
def get_group(request: Request, org_id: str, group_id: str) -> Response:
    return _get(request, org_id, GROUP, group_id)


# --------------------------------------------------------------------------
# Users: writes


@router.post("/Users")
def create_user(request: Request, org_id: str, body: bytes = Depends(read_body)) -> Response:
    ctx = _ctx(request, org_id)
    proj = _projection(ctx, USER)
    doc = accept(USER, _json(body))
    try:
        with ctx.writing() as s:
            row = store.create_user(s, ctx.org, doc)
            view = _view(s, ctx, USER, row, proj)
            touch(s, ctx.org)      # last: the org row stays locked until the commit
    except IntegrityError as exc:
        raise store.integrity_conflict(exc, USER) from None
    ctx.poke()
    return _resource_response(ctx, USER, row, view, 201, location=True)


def _write_user(ctx: Ctx, user_id: str, proj: Projection, change: Callable[[Any], dict]) -> Response:
    """Lock the user, check If-Match, store ``change(row)`` if it differs."""
    changed = False
    try:
        with ctx.writing() as s:
            row = store.get_user(s, ctx.org, user_id, lock=True)
            _check_if_match(ctx, row.version)
            doc = change(row)
            if doc != row.doc:
                row = store.save_user(s, ctx.org, row, doc)
                touch(s, ctx.org)
                changed = True
            view = _view(s, ctx, USER, row, proj)
    except IntegrityError as exc:
        raise store.integrity_conflict(exc, USER) from None
    if changed:
        ctx.poke()
    return _resource_response(ctx, USER, row, view)


@router.put("/Users/{user_id}")
def replace_user(request: Request, org_id: str, user_id: str,
                 body: bytes = Depends(read_body)) -> Response:
    ctx = _ctx(request, org_id)
    proj = _projection(ctx, USER)
    doc = accept(USER, _json(body))
    return _write_user(ctx, user_id, proj, lambda row: doc)


@router.patch("/Users/{user_id}")
def patch_user(request: Request, org_id: str, user_id: str,
               body: bytes = Depends(read_body)) -> Response:
    ctx = _ctx(request, org_id)
    proj = _projection(ctx, USER)
    ops = normalize(USER, _json(body))
    return _write_user(ctx, user_id, proj, lambda row: apply_patch(USER, row.doc, ops))


@router.delete("/Users/{user_id}")
def delete_user(request: Request, org_id: str, user_id: str) -> Response:
    ctx = _ctx(request, org_id)
    with ctx.writing() as s:
        _check_if_match(ctx, store.delete_user(s, ctx.org, user_id))
        touch(s, ctx.org)
    ctx.poke()
    return Response(status_code=204)


# --------------------------------------------------------------------------
# Groups: writes


def _group_write(ctx: Ctx, group_id: str, op: str, work: Callable[[Any, Any], Any],
                 prepare: Callable[[], Any] = lambda: None) -> Any:
    """``prepare()`` (parsing, validation: no database), then
    ``work(session, prepared)`` in one transaction; if either fails, note
    the failure on the group (when it exists) after the rollback."""
    try:
        prepared = prepare()
        with ctx.writing() as s:
            result = work(s, prepared)
    except ScimError as exc:
        if exc.status != 404:
            _record_failure(ctx, group_id, op, f"{exc.status} {exc.detail}")
        raise
    except IntegrityError as exc:
        err = store.integrity_conflict(exc, GROUP)
        _record_failure(ctx, group_id, op, f"{err.status} {err.detail}")
        raise err from None
    except Exception as exc:
        _record_failure(ctx, group_id, op, f"500 internal error ({type(exc).__name__})")
        raise
    ctx.poke()
    return result


def _record_failure(ctx: Ctx, group_id: str, op: str, outcome: str) -> None:
    with ctx.writing() as s:
        store.record_sync_failure(s, ctx.org, group_id, op, outcome)


def _check_group_ids(s: Session, ctx: Ctx, group_id: str, before: dict | None,
                     doc: dict) -> None:
    """The group's externalId and SID, when new or changed, are no other
    group's (the bundle refuses duplicates); runs after ``touch``."""
    after = group_columns(doc)
    old = group_columns(before) if before is not None else {}
    ext = after["external_id"] if after["external_id_key"] != old.get("external_id_key") else None
    sid = after["sid"] if after["sid"] != old.get("sid") else None
    try:
        policycheck.group_ids(s, ctx.org, group_id, external_id=ext, sid=sid)
    except policycheck.WriteRefused as exc:
        raise ScimError(exc.status, exc.message, UNIQUENESS) from None


def _split_members(doc: dict) -> list[dict] | None:
    members = doc.pop("members", None)
    if members is not None:
        member_values(members)           # each needs a "value"
    return members


@router.post("/Groups")
def create_group(request: Request, org_id: str, body: bytes = Depends(read_body)) -> Response:
    ctx = _ctx(request, org_id)
    proj = _projection(ctx, GROUP)
    doc = accept(GROUP, _json(body))
    members = _split_members(doc)
    try:
        with ctx.writing() as s:
            row = store.create_group(s, ctx.org, doc)
            if members:
                store.replace_members(s, ctx.org, row.id, members)
                view = _view(s, ctx, GROUP, row, proj)
            else:   # Entra creates groups empty: nothing to look up for the answer
                view = proj.apply(render(GROUP, row, ctx.base,
                                         members=[] if proj.wants("members") else None))
            touch(s, ctx.org)      # after the view: the org row stays locked until the commit
            _check_group_ids(s, ctx, row.id, None, doc)
    except IntegrityError as exc:
        raise store.integrity_conflict(exc, GROUP) from None
    ctx.poke()
    return _resource_response(ctx, GROUP, row, view, 201, location=True)


@router.put("/Groups/{group_id}")
def replace_group(request: Request, org_id: str, group_id: str,
                  body: bytes = Depends(read_body)) -> Response:
    ctx = _ctx(request, org_id)
    proj = _projection(ctx, GROUP)

    def prepare():
        doc = accept(GROUP, _json(body))
        return doc, _split_members(doc)

    def work(s, prepared):
        doc, members = prepared
        row = store.begin_group_write(s, ctx.org, group_id, "replace")
        _check_if_match(ctx, row.version - 1)
        before = row.doc
        row = store.save_group(s, ctx.org, row, doc)
        # members left out of a PUT are not asserted (RFC 7644 §3.5.1): they stay
        if members is not None:
            store.replace_members(s, ctx.org, row.id, members)
        touch(s, ctx.org)
        _check_group_ids(s, ctx, row.id, before, doc)
        return row, _view(s, ctx, GROUP, row, proj)

    row, view = _group_write(ctx, group_id, "replace", work, prepare)
    return _resource_response(ctx, GROUP, row, view)


@router.patch("/Groups/{group_id}")
def patch_group(request: Request, org_id: str, group_id: str,
                body: bytes = Depends(read_body)) -> Response:
    ctx = _ctx(request, org_id)
    proj = _projection(ctx, GROUP)
    shown = "attributes" in ctx.params or "excludedattributes" in ctx.params

    def prepare():
        ops = normalize(GROUP, _json(body))
        return ops, member_ops(ops)

    def work(s, prepared):
        ops, mops = prepared
        row = store.begin_group_write(s, ctx.org, group_id, summary(ops, mops))
        _check_if_match(ctx, row.version - 1)
        before = None
        if any(not op.is_members for op in ops):
            doc = apply_patch(GROUP, row.doc, ops)
            if doc != row.doc:
                before = row.doc
                row = store.save_group(s, ctx.org, row, doc)
        store.apply_members(s, ctx.org, group_id, mops)
        touch(s, ctx.org)
        if before is not None:
            _check_group_ids(s, ctx, row.id, before, row.doc)
        return (row, _view(s, ctx, GROUP, row, proj)) if shown else None

    shown_row = _group_write(ctx, group_id, "update", work, prepare)
    # Entra ID expects 204 for group PATCH; a body only when attributes are asked for
    return Response(status_code=204) if shown_row is None else \
        _resource_response(ctx, GROUP, *shown_row)


@router.delete("/Groups/{group_id}")
def delete_group(request: Request, org_id: str, group_id: str) -> Response:
    ctx = _ctx(request, org_id)

    def work(s, _prepared):
        _check_if_match(ctx, store.delete_group(s, ctx.org, group_id))
        touch(s, ctx.org)

    _group_write(ctx, group_id, "delete", work)
    return Response(status_code=204)


# --------------------------------------------------------------------------
# Discovery


@router.get("/ServiceProviderConfig")
def service_provider_config(request: Request, org_id: str) -> Response:
    ctx = _ctx(request, org_id)
    return ScimResponse(discovery.service_provider_config(ctx.base))


@router.get("/ResourceTypes")
def resource_types(request: Request, org_id: str) -> Response:
    ctx = _ctx(request, org_id)
    docs = discovery.resource_types(ctx.base)
    return _list_response(docs, len(docs), 1)


@router.get("/ResourceTypes/{type_id}")
def resource_type(request: Request, org_id: str, type_id: str) -> Response:
    ctx = _ctx(request, org_id)
    for doc in discovery.resource_types(ctx.base):
        if doc["id"].casefold() == type_id.casefold():
            return ScimResponse(doc)
    raise not_found(f"no ResourceType {type_id!r}; there are User and Group")


@router.get("/Schemas")
def schemas(request: Request, org_id: str) -> Response:
    ctx = _ctx(request, org_id)
    docs = discovery.schemas(ctx.base)
    return _list_response(docs, len(docs), 1)


@router.get("/Schemas/{schema_id}")
def schema(request: Request, org_id: str, schema_id: str) -> Response:
    ctx = _ctx(request, org_id)
    for doc in discovery.schemas(ctx.base):
        if doc["id"].casefold() == schema_id.casefold():
            return ScimResponse(doc)
    raise not_found(f"no Schema {schema_id!r}")


# --------------------------------------------------------------------------
# Everything else under /scim: SCIM errors, not the framework's


_ENDPOINTS = [
    (re.compile(r"^(Users|Groups)$"), {"GET", "POST"}),
    (re.compile(r"^(Users|Groups)/[^/]+$"), {"GET", "PUT", "PATCH", "DELETE"}),
    (re.compile(r"^(ServiceProviderConfig|ResourceTypes|Schemas)$"), {"GET"}),
    (re.compile(r"^(ResourceTypes|Schemas)/[^/]+$"), {"GET"}),
]


def _unknown(request: Request, rest: str) -> Response:
    for pattern, allowed in _ENDPOINTS:
        if pattern.match(rest):
            listed = ", ".join(sorted(allowed))
            raise ScimError(405, f"{request.method} is not allowed here; use {listed}",
                            headers={"Allow": listed})
    raise not_found(f"no SCIM endpoint at {request.url.path}")


@router.api_route("/{rest:path}", methods=ALL_METHODS, include_in_schema=False)
def unknown_in_org(request: Request, org_id: str, rest: str) -> Response:
    _ctx(request, org_id)
    return _unknown(request, rest)


@fallback.api_route("/scim/{rest:path}", methods=ALL_METHODS, include_in_schema=False)
def unknown(request: Request, rest: str) -> Response:
    raise not_found(f"no SCIM endpoint at {request.url.path}; the tenant URL is "
                    f"/scim/orgs/<org id>/")


class _CollapseSlashes:
    """``/scim/orgs/1//Users`` -> ``/scim/orgs/1/Users``: the Tenant URL is
    entered with a trailing slash, and a client that appends "/Users" to it
    must still reach the endpoint."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith("/scim/") and "//" in path:
                scope = dict(scope)
                scope["path"] = re.sub("/{2,}", "/", path)
                scope["raw_path"] = re.sub(b"/{2,}", b"/", scope.get("raw_path") or path.encode())
        await self.app(scope, receive, send)


def install(app: FastAPI) -> None:
    app.add_middleware(_CollapseSlashes)
    sqlite = app.state.engine.dialect.name == "sqlite"
    app.state.scim_read_options = {"read_only": True} if sqlite else {
        "isolation_level": "AUTOCOMMIT"}
    app.include_router(router, tags=["scim"])
    app.include_router(fallback)
