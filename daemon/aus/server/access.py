"""Who may call what: the scope every route needs, and the one check that
authenticates a request's API key and holds it to that scope.

:data:`ROUTES` maps each route (path template, method) to what it needs:

    scim      the SCIM endpoint (what Entra ID's Secret Token may do)
    workload  what ausd does: the bundle (fetch, long-poll, check-in), flow upload
    read      every read of the management API and the console's reads
    admin     every change (an admin key may also do all of the above)
    ANY       any valid key of the org (the console's sign-in)
    PUBLIC    no key at all (the console's files, the API's description)

A route missing here needs ``admin`` (closed by default); the scope test
walks the application's routes and fails for any route missing here.

:func:`authorize` is used by every authenticated route: the management
API's ``org_auth``, the bundle, SCIM's request context, ``/api/whoami``.
It refuses a key outside its scope with a 403 naming both scopes, and logs
every refusal, with the client's address and the key id when the
credentials are parseable (never the secret), on the ``aus.auth`` logger.
"""

from __future__ import annotations

import asyncio
import logging
import re

from starlette.requests import Request
from starlette.routing import compile_path

from .auth import AuthError, Key, client_address, token_from_header
from .scopes import ADMIN, READ, SCIM, WORKLOAD

log = logging.getLogger("aus.auth")

ANY = "any key"
PUBLIC = "no key"
ALL_METHODS = "*"

_ORG = "/api/orgs/{org_id}"
_SCIM = "/scim/orgs/{org_id}"

# path template -> {method or "*": what it needs}
ROUTES: dict[str, dict[str, str]] = {
    # no key
    "/": {"GET": PUBLIC},
    "/console": {ALL_METHODS: PUBLIC},
    "/api/docs": {"GET": PUBLIC},
    "/healthz": {"GET": PUBLIC},                         # probes: no key (health.py)
    "/readyz": {"GET": PUBLIC},
    "/metrics": {"GET": PUBLIC},                         # its own optional token (metrics.py)
    "/api/openapi.json": {"GET": PUBLIC, "HEAD": PUBLIC},
    "/scim/{rest:path}": {ALL_METHODS: PUBLIC},          # outside any org: a SCIM 404
    # sign-in: which org (and scopes) a key has
    "/api/whoami": {"GET": ANY},
    f"{_ORG}/whoami": {"GET": ANY},
    # SCIM, all of it
    f"{_SCIM}/Users": {"GET": SCIM, "POST": SCIM},
    f"{_SCIM}/Users/{{user_id}}": {"GET": SCIM, "PUT": SCIM, "PATCH": SCIM, "DELETE": SCIM},
    f"{_SCIM}/Groups": {"GET": SCIM, "POST": SCIM},
    f"{_SCIM}/Groups/{{group_id}}": {"GET": SCIM, "PUT": SCIM, "PATCH": SCIM, "DELETE": SCIM},
    f"{_SCIM}/ServiceProviderConfig": {"GET": SCIM},
    f"{_SCIM}/ResourceTypes": {"GET": SCIM},
    f"{_SCIM}/ResourceTypes/{{type_id}}": {"GET": SCIM},
    f"{_SCIM}/Schemas": {"GET": SCIM},
    f"{_SCIM}/Schemas/{{schema_id}}": {"GET": SCIM},
    f"{_SCIM}/{{rest:path}}": {ALL_METHODS: SCIM},       # unknown endpoints: SCIM 404/405
    # what ausd does
    f"{_ORG}/bundle": {"GET": WORKLOAD},                   # fetch, long-poll and check-in
    f"{_ORG}/flows": {"POST": WORKLOAD},
    # the management API
    f"{_ORG}/groups": {"GET": READ, "POST": ADMIN},
    f"{_ORG}/groups/{{group_id}}": {"GET": READ, "DELETE": ADMIN},
    f"{_ORG}/ip-lists": {"GET": READ, "POST": ADMIN},
    f"{_ORG}/ip-lists/{{list_id}}": {"PUT": ADMIN, "DELETE": ADMIN},
    f"{_ORG}/rules": {"GET": READ, "POST": ADMIN},
    f"{_ORG}/rules/{{rule_id}}": {"GET": READ, "PUT": ADMIN, "DELETE": ADMIN},
    f"{_ORG}/policy": {"GET": READ},
    f"{_ORG}/workloads": {"GET": READ},
    f"{_ORG}/mode": {"GET": READ, "PUT": ADMIN},
    f"{_ORG}/workloads/{{name}}/mode": {"PUT": ADMIN},
    f"{_ORG}/draft": {"GET": READ, "DELETE": ADMIN},
    f"{_ORG}/draft/preview": {"POST": READ},              # computes, changes nothing
    f"{_ORG}/provision": {"POST": ADMIN},
    f"{_ORG}/policy/versions": {"GET": READ},
    f"{_ORG}/policy/versions/{{version}}": {"GET": READ},
    f"{_ORG}/policy/diff": {"GET": READ},
    f"{_ORG}/policy/versions/{{version}}/rollback": {"POST": ADMIN},
    f"{_ORG}/traffic": {"GET": READ},
    f"{_ORG}/traffic/grouped": {"GET": READ},
    f"{_ORG}/audit": {"GET": READ},
}

_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ScopeError(AuthError):
    """A valid key used outside its scopes (403); ``detail`` names both."""

    def __init__(self, granted: tuple[str, ...], needed: str):
        self.detail = f"key has scope {' '.join(granted) or '(none)'}; this route needs {needed}"
        super().__init__(f"this API key may not use this route: {self.detail}", 403)


def needs(method: str, path: str) -> str:
    """What the route ``path`` (its template) needs for ``method``."""
    methods = ROUTES.get(path, {})
    return methods.get(method.upper(), methods.get(ALL_METHODS, ADMIN))


def allows(granted: tuple[str, ...], needed: str) -> bool:
    return needed in (ANY, PUBLIC) or ADMIN in granted or needed in granted


def _route_path(request: Request) -> str | None:
    route = request.scope.get("route")
    return getattr(route, "path", None)


def _key_id_of(token: str | None) -> str:
    """The key id a credential names, if it looks like one (for the log)."""
    key_id, sep, _secret = (token or "").partition(":")
    return key_id if sep and _KEY_ID.match(key_id) else "-"


def log_refusal(request: Request, token: str | None, exc: AuthError) -> None:
    """One WARNING line: the route, the client's address, the key id when
    the credentials name one (never the secret), the answer."""
    log.warning("authentication refused: %s %s from %s, key %s: %d %s", request.method,
                request.url.path, client_address(request), _key_id_of(token), exc.status, exc)


def _check(request: Request, org_id: str | None, scim: bool, cached_only: bool,
           needed: str) -> Key | None:
    token = None
    try:
        token = token_from_header(request.headers.get("authorization"), basic=not scim,
                                  bearer=True)
        key = request.app.state.verifier.for_org(token, org_id, cached_only=cached_only,
                                                 source=client_address(request))
        if key is None:
            return None
        if not allows(key.scopes, needed):
            raise ScopeError(key.scopes, needed)
    except AuthError as exc:
        log_refusal(request, token, exc)
        raise
    return key


def authorize(request: Request, org_id: str | None, *, scim: bool = False,
              cached_only: bool = False) -> Key | None:
    """The API key of ``request``, of ``org_id`` (any org when None), with
    the scope its route needs (:data:`ROUTES`); also left in
    ``request.state.key_id``. AuthError (ScopeError for the scope)
    otherwise. SCIM takes Bearer only; the API Basic too. With
    ``cached_only``, None when the cache cannot tell (no I/O)."""
    key = _check(request, org_id, scim, cached_only,
                 needs(request.method, _route_path(request) or ""))
    if key is not None:
        request.state.key_id = key.id
    return key


def authorize_before_routing(request: Request, org_id: str | None, *, scim: bool,
                             cached_only: bool = False) -> Key | None:
    """:func:`authorize` for a request not yet routed (the input gate
    checks a body's sender before reading the body): the route is found by
    matching the path against :data:`ROUTES`. A path that matches none is
    left to its route (the router's 404 or redirect, or the route's own
    :func:`authorize`), which every authenticated route calls anyway.
    With ``cached_only``, None when the cache cannot tell (no I/O)."""
    template = template_of(request.method, request.url.path)
    needed = ANY if template is None else needs(request.method, template)
    return _check(request, org_id, scim, cached_only, needed)


def _compiled() -> list[tuple[re.Pattern, str]]:
    # catch-alls ({...:path}) after every specific template
    ordered = sorted(ROUTES, key=lambda t: (":path}" in t, -len(t)))
    return [(compile_path(t)[0], t) for t in ordered]


_TEMPLATES = _compiled()


def template_of(method: str, path: str) -> str | None:
    """The template in :data:`ROUTES` that ``path`` falls under, preferring
    one that takes ``method``."""
    found = None
    for regex, template in _TEMPLATES:
        if regex.match(path):
            methods = ROUTES[template]
            if method.upper() in methods or ALL_METHODS in methods:
                return template
            found = found or template
    return found


async def authorize_async(request: Request, org_id: str | None) -> Key:
    """:func:`authorize` for a coroutine: a cached key at once, else the
    check (scrypt) on a worker thread, off the event loop."""
    return (authorize(request, org_id, cached_only=True)
            or await asyncio.to_thread(authorize, request, org_id))
