"""The policy lifecycle under ``/api/orgs/{org_id}/``: the draft (its diff
against the policy in force, discard, the impact preview), provisioning,
and the history of provisioned versions (get, diff, rollback). See
docs/policy-lifecycle.md and ``policyversions``."""

from __future__ import annotations

import copy

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from pydantic import Field
from sqlalchemy import func, select

from ..core.errors import PolicyError
from . import policyversions as pv
from .api import API_PREFIX, ApiError, _Body, _session, org_auth, org_key
from .db import PolicyVersion
from .preview import MAX_DAYS, parse_baseline, preview

router = APIRouter(prefix=API_PREFIX, tags=["policy lifecycle"])
MAX_PAGE = 500
MAX_VERSION = 2**31 - 1     # the version column (INTEGER)
Version = Path(ge=1, le=MAX_VERSION)


class ProvisionIn(_Body):
    note: str = Field("", max_length=pv.MAX_NOTE)


class PreviewIn(_Body):
    days: int = Field(7, ge=1, le=MAX_DAYS)
    baseline: list[str] = Field(default_factory=list, max_length=256)


class RollbackIn(_Body):
    note: str = Field("", max_length=pv.MAX_NOTE)


def _conflict(exc: pv.PolicyConflict) -> ApiError:
    return ApiError(exc.status, exc.message, exc.fields)


@router.get("/draft")
def get_draft(request: Request, org_id: str = Depends(org_auth)) -> dict:
    """The pending changes: the draft against the version in force."""
    with _session(request)() as s:
        return pv.draft_view(s, org_id)


@router.delete("/draft")
def discard_draft(request: Request, org_id: str = Depends(org_auth)) -> dict:
    """Discard the draft: the rules and IP lists return to the version in force."""
    with _session(request).begin() as s:
        pv.discard(s, org_id, request.state.key_id)
        view = pv.draft_view(s, org_id)
    return view


@router.post("/draft/preview")
def preview_draft(request: Request, body: PreviewIn | None = None,
                  org_id: str = Depends(org_auth)) -> dict:
    """Flows of the last ``days`` days whose verdict the draft would change."""
    body = body or PreviewIn()
    try:
        baseline = parse_baseline(body.baseline)
    except ValueError as exc:
        raise ApiError(422, "the request is not valid",
                       [{"field": "baseline", "message": str(exc)}]) from None
    with _session(request)() as s:
        s.connection(execution_options={"read_only": True})   # no SQLite write lock
        try:
            out = preview(s, org_id, body.days, baseline)
        except PolicyError as exc:
            raise ApiError(422, "the draft cannot be previewed: workloads would refuse it",
                           [{"field": "policy", "message": p} for p in exc.problems]) from None
        out["draft"] = pv.draft_view(s, org_id)["changes"]
    return out


@router.post("/provision")
def provision(request: Request, body: ProvisionIn | None = None,
              who: tuple[str, str] = Depends(org_key)) -> dict:
    """Publish the draft as a new policy version."""
    org_id, key_id = who
    body = body or ProvisionIn()
    try:
        with _session(request).begin() as s:
            row = pv.provision(s, org_id, key_id, body.note)
            view = pv.version_view(row)
    except pv.PolicyConflict as exc:
        raise _conflict(exc) from None
    request.app.state.bundles.rebuild_now(org_id)
    return {"policy_version": view["version"], **view}


@router.get("/policy/versions")
def list_versions(request: Request, org_id: str = Depends(org_auth),
                  offset: int = Query(0, ge=0, le=2**31), limit: int = Query(50, ge=1, le=MAX_PAGE)) -> dict:
    with _session(request)() as s:
        total = s.scalar(select(func.count()).select_from(PolicyVersion)
                         .where(PolicyVersion.org_id == org_id))
        rows = s.scalars(select(PolicyVersion).where(PolicyVersion.org_id == org_id)
                         .order_by(PolicyVersion.version.desc()).offset(offset).limit(limit)).all()
        active = pv.active_version(s, org_id)
        return {"total": total, "offset": offset, "limit": limit,
                "active_version": active.version if active else 0,
                "items": [pv.version_view(r) for r in rows]}


def _version(s, org_id: str, version: int) -> PolicyVersion:
    row = pv.get_version(s, org_id, version)
    if row is None:
        raise ApiError(404, f"no policy version {version} in this org")
    return row


@router.get("/policy/versions/{version}")
def get_version(request: Request, version: int = Version, org_id: str = Depends(org_auth)) -> dict:
    with _session(request)() as s:
        return pv.version_view(_version(s, org_id, version), full=True)


@router.get("/policy/diff")
def diff_versions(request: Request, org_id: str = Depends(org_auth),
                  from_: int = Query(..., alias="from", ge=0, le=MAX_VERSION),
                  to: int = Query(..., ge=0, le=MAX_VERSION)) -> dict:
    """What changed from one version to another (0: the empty policy
    before the first version)."""
    with _session(request)() as s:
        before = copy.deepcopy(_version(s, org_id, from_).spec) if from_ else pv.EMPTY_SPEC
        after = copy.deepcopy(_version(s, org_id, to).spec) if to else pv.EMPTY_SPEC
        names = pv.group_names(s, org_id, pv.spec_group_ids(before, after))
        return {"from": from_, "to": to, **pv.diff_specs(before, after, names)}


@router.post("/policy/versions/{version}/rollback")
def rollback(request: Request, version: int = Version, body: RollbackIn | None = None,
             who: tuple[str, str] = Depends(org_key)) -> dict:
    """Publish an old version as a new version; refused while the draft
    has pending changes."""
    org_id, key_id = who
    body = body or RollbackIn()
    try:
        with _session(request).begin() as s:
            row = pv.rollback(s, org_id, version, key_id, body.note)
            view = pv.version_view(row)
    except pv.PolicyConflict as exc:
        raise _conflict(exc) from None
    request.app.state.bundles.rebuild_now(org_id)
    return {"policy_version": view["version"], **view}


def install(app: FastAPI) -> None:
    app.include_router(router)

