"""SCIM errors (RFC 7644 §3.12) and the JSON responses SCIM speaks.

Every failure under ``/scim`` leaves as an ``urn:ietf:params:scim:api:
messages:2.0:Error`` body, status as a string, with a ``scimType`` where
RFC 7644 defines one. :class:`ScimRoute` converts whatever a handler
raises, so the management API's own error handlers never see SCIM traffic
and SCIM never depends on them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger("aus.server.scim")

ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
MEDIA_TYPE = "application/scim+json"

# scimType values of RFC 7644 §3.12, table 9.
INVALID_FILTER = "invalidFilter"
TOO_MANY = "tooMany"
UNIQUENESS = "uniqueness"
MUTABILITY = "mutability"
INVALID_SYNTAX = "invalidSyntax"
INVALID_PATH = "invalidPath"
NO_TARGET = "noTarget"
INVALID_VALUE = "invalidValue"
INVALID_VERS = "invalidVers"
SENSITIVE = "sensitive"


class ScimError(Exception):
    def __init__(self, status: int, detail: str, scim_type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.scim_type = scim_type
        self.headers = headers or {}

    def response(self) -> Response:
        return error_response(self.status, self.detail, self.scim_type, self.headers)


def bad_request(detail: str, scim_type: str = INVALID_VALUE) -> ScimError:
    return ScimError(400, detail, scim_type)


def not_found(detail: str) -> ScimError:
    return ScimError(404, detail)


class ScimResponse(Response):
    media_type = MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def error_response(status: int, detail: str, scim_type: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body: dict[str, Any] = {"schemas": [ERROR_SCHEMA], "status": str(status)}
    if scim_type:
        body["scimType"] = scim_type
    body["detail"] = detail
    return ScimResponse(body, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


class ScimRoute(APIRoute):
    """A route whose every failure is answered in the SCIM Error schema."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def scim_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ScimError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return error_response(400, _validation_detail(exc), INVALID_VALUE)
            except HTTPException as exc:
                return error_response(exc.status_code, str(exc.detail), None,
                                      getattr(exc, "headers", None))
            except Exception:
                log.exception("SCIM %s %s failed", request.method, request.url.path)
                return error_response(500, "internal server error; the change, if any, "
                                           "was not applied")

        return scim_handler
