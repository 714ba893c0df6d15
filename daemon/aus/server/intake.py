"""What a request may carry, checked before any handler parses it.

:class:`InputGate` is the outermost ASGI middleware. For every HTTP request:

1. Headers: a NUL or other control character in any header, or a
   non-ASCII ``Authorization`` header, is refused (400, or 401 for the
   credentials) before a handler sees it.
2. Credentials first: on the routes that need an API key (``/scim/orgs/
   <org>/...``, ``/api/orgs/<org>/...``, ``/api/whoami``) a request that
   carries a body is authenticated, and held to its route's scope
   (:mod:`.access`), before one byte of the body is read, so an
   unauthenticated or out-of-scope upload costs the server nothing.
3. Size: the body is capped per route (:data:`LIMITS`): a ``Content-Length``
   above the cap is answered 413 at once; a body without one is counted as
   it streams and refused as soon as it passes the cap.
4. Flow batches (``POST /api/orgs/<org>/flows``) may come with
   ``Content-Encoding: gzip``: the body (compressed or not) is capped at
   :data:`MAX_BATCH_BYTES`, then inflated here with the same cap on what
   it inflates to, reading at most one byte past it, so a zip bomb is
   refused (413) having cost that much memory and no more. A broken gzip
   stream is refused (400), any other encoding too (415). The route sees
   the inflated body without the header. It is not walked by
   :func:`check_json`: the route parses it and validates it against
   :class:`~aus.core.flowrecord.FlowBatch`, whose bounds are tighter than
   the walk's for every value (a fixed shape; each string capped and free
   of control characters and lone surrogates; each number in range), and
   parses it only when its turn to be stored comes, so batches waiting
   their turn hold bytes, not millions of small objects.
5. Content: a JSON body of SCIM or the API (but a flow batch) is parsed once with bounds
   (:func:`check_json`): nesting, numbers, NaN/Infinity, NUL and unpaired
   surrogates are refused with 400 here; plain malformed JSON is left to the
   handler, which says where it broke. The path and query string may not
   carry NUL either.

Refusals under ``/scim`` are SCIM Error bodies (RFC 7644 §3.12); elsewhere
the management API's ``{"error": {...}}``.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import zlib
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.flowrecord import MAX_BATCH_BYTES
from .access import authorize_before_routing, log_refusal
from .auth import AuthError
from .scim.discovery import MAX_PAYLOAD
from .scim.errors import INVALID_SYNTAX, INVALID_VALUE, error_response

SCIM_LIMIT = MAX_PAYLOAD           # a group with tens of thousands of members
API_LIMIT = 2 * 1024 * 1024        # an IP list of a few thousand entries
OTHER_LIMIT = 64 * 1024            # nothing else takes a body
MAX_DEPTH = 32                     # SCIM's deepest document nests 4 levels
MAX_INT_DIGITS = 18                # |n| < 10**18 fits a 64-bit column
MAX_STRING = 1024 * 1024           # one JSON string

_FLOWS = re.compile(r"^/api/orgs/[^/]+/flows/?$")
_SCIM_ORG = re.compile(r"^/scim/orgs/([^/]+)(/|$)")
_API_ORG = re.compile(r"^/api/orgs/([^/]+)(/|$)")
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_NUL_ESCAPE = re.compile(rb"%00")


class InputError(ValueError):
    """A JSON body outside the bounds; ``where`` is the JSON path."""

    def __init__(self, message: str, where: str = "", scim_type: str = INVALID_VALUE):
        self.where = where
        self.scim_type = scim_type
        super().__init__(f"{message} at {where}" if where else message)


def _int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > MAX_INT_DIGITS:
        raise InputError(f"the integer {text[:24]}… has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InputError(f"the number {text[:24]} is out of range")
    return value


def _constant(text: str) -> Any:
    raise InputError(f"{text} is not a JSON number")


def check_json(body: bytes) -> Any:
    """Parse ``body`` with bounds; InputError for what is refused, ValueError
    (not InputError) for what is simply malformed."""
    try:
        doc = json.loads(body, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise InputError(f"the JSON nests deeper than {MAX_DEPTH} levels",
                         scim_type=INVALID_SYNTAX) from None
    stack: list[tuple[Any, str, int]] = [(doc, "$", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InputError(f"the JSON nests deeper than {MAX_DEPTH} levels", where, INVALID_SYNTAX)
        if isinstance(value, str):
            _check_string(value, where)
        elif isinstance(value, dict):
            for k, v in value.items():
                _check_string(k, f"{where} (a member name)")
                stack.append((v, f"{where}.{k[:64]}", depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
    return doc


def _check_string(s: str, where: str) -> None:
    if len(s) > MAX_STRING:
        raise InputError(f"a string is longer than {MAX_STRING} characters", where)
    m = _BAD_CHARS.search(s)
    if m:
        what = "a NUL character" if m.group() == "\x00" else \
            f"an unpaired surrogate (U+{ord(m.group()):04X})"
        raise InputError(f"the string contains {what}", where)


class EncodingError(ValueError):
    """A compressed body that cannot be taken: ``status`` 400, 413 or 415."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def inflate(body: bytes, encoding: str, limit: int = MAX_BATCH_BYTES) -> bytes:
    """``body`` decoded per its Content-Encoding (``gzip`` or ``identity``),
    never more than ``limit`` bytes of it."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise EncodingError(415, f"the Content-Encoding {encoding[:32]!r} is not supported; "
                                 f"send gzip or identity")
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise EncodingError(400, f"the gzip body is not valid: {exc}") from None
    if len(out) > limit:
        raise EncodingError(413, f"the gzip body inflates to more than {limit} bytes")
    if not d.eof:
        raise EncodingError(400, "the gzip body is cut short")
    if d.unused_data:
        raise EncodingError(400, "the gzip body has data after its end (one gzip member only)")
    return out


def limit_for(path: str) -> int:
    if _FLOWS.match(path):
        return MAX_BATCH_BYTES
    if _SCIM_ORG.match(path):
        return SCIM_LIMIT
    if _API_ORG.match(path) or path == "/api/whoami":
        return API_LIMIT
    return OTHER_LIMIT


class InputGate:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        scim = path.startswith("/scim/")
        refused = self._check_head(scope, path, scim)
        if refused is not None:
            await refused(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers") or ()}
        length = headers.get(b"content-length")
        has_body = (length is not None and length.strip() not in (b"", b"0")) or \
            b"transfer-encoding" in headers
        if not has_body:
            await self.app(scope, receive, send)
            return
        org = self._org(path)
        if org is not None:
            try:
                # checked as the handler will check them (failed checks count
                # against the client's address, as there): a cached key here,
                # else the check (scrypt, a database read) on a worker thread
                request, wanted = Request(scope), None if org == "" else org
                if authorize_before_routing(request, wanted, scim=scim, cached_only=True) is None:
                    await asyncio.to_thread(authorize_before_routing, request, wanted, scim=scim)
            except AuthError as exc:
                await self._auth_refusal(exc, scim)(scope, receive, send)
                return
        limit = limit_for(path)
        if length is not None and length.strip().isdigit() and int(length) > limit:
            await _refuse(scim, 413, f"the request body is larger than {limit} bytes")(
                scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _refuse(scim, 413, f"the request body is larger than {limit} bytes")(
                    scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if org is not None and _FLOWS.match(path) and body.strip():
            encoding = headers.get(b"content-encoding", b"").decode("latin-1")
            try:
                body = await asyncio.to_thread(inflate, body, encoding)
            except EncodingError as exc:
                await _refuse(scim, exc.status, str(exc))(scope, receive, send)
                return
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"]
                                if k.lower() not in (b"content-encoding", b"content-length")]
            scope["headers"].append((b"content-length", str(len(body)).encode()))
        elif org is not None and body.strip():
            try:
                if len(body) > OTHER_LIMIT:
                    # a SCIM body of megabytes takes a second's fraction to walk:
                    # off the event loop, which long-polls and other requests share
                    await asyncio.to_thread(check_json, body)
                else:
                    check_json(body)
            except InputError as exc:
                await _refuse(scim, 400, f"the request body is refused: {exc}",
                              exc.scim_type)(scope, receive, send)
                return
            except ValueError:
                pass                        # malformed: the handler says where

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _org(path: str) -> str | None:
        """The org an authenticated route acts on; "" for any org
        (``/api/whoami``); None for routes without credentials."""
        m = _SCIM_ORG.match(path) or _API_ORG.match(path)
        if m:
            return m.group(1)
        return "" if path == "/api/whoami" else None

    @staticmethod
    def _check_head(scope: Scope, path: str, scim: bool):
        if "\x00" in path:
            return _refuse(scim, 400, "the path contains a NUL character")
        query = scope.get("query_string") or b""
        if b"\x00" in query or _NUL_ESCAPE.search(query.lower()):
            return _refuse(scim, 400, "the query string contains a NUL character")
        for name, value in scope.get("headers") or ():
            if _CONTROL.search(value):
                return _refuse(scim, 400, f"the header {name.decode('latin-1')!r} contains "
                                          f"a control character")
            if name.lower() == b"authorization" and not value.isascii():
                exc = AuthError("the Authorization header is not ASCII")
                log_refusal(Request(scope), None, exc)
                return InputGate._auth_refusal(exc, scim)
        return None

    @staticmethod
    def _auth_refusal(exc: AuthError, scim: bool):
        if exc.status != 401:
            retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            return _refuse(scim, exc.status, str(exc), headers=retry,
                           detail=getattr(exc, "detail", None))
        scheme = "Bearer" if scim else "Basic"
        return _refuse(scim, 401, str(exc), headers={"WWW-Authenticate": f'{scheme} realm="aus-server"'})


def _refuse(scim: bool, status: int, message: str, scim_type: str | None = None,
            headers: dict[str, str] | None = None, detail: str | None = None) -> Response:
    if scim:
        if status == 400 and scim_type is None:
            scim_type = INVALID_VALUE
        return error_response(status, message, scim_type, headers)
    body: dict[str, Any] = {"error": {"status": status, "message": message, "fields": []}}
    if detail is not None:
        body["detail"] = detail          # as the management API answers (api.py)
    return JSONResponse(body, status_code=status, headers=headers)
