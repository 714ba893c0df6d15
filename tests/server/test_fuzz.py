"""Fuzzing aus-server: schemathesis over its OpenAPI document, and a
grammar-aware SCIM fuzzer (filters, PATCH operations, numbers, unicode,
broken JSON) built on hypothesis. Both are seeded (derandomized) and
bounded; ``AUS_FUZZ_REQUESTS`` sets how many requests each sends (the
default keeps a run within about half a minute per database).

What must hold: no answer 5xx, no request slower than :data:`HANG_SECONDS`,
no exception out of the app; every refused (4xx) request left the org's data
as it was; afterwards every listing pages through, the bundle answers, the
database passes its integrity check, and another org is untouched.

Shapes that make the bundle build refuse data (case-insensitive duplicate
rule names, reserved names, duplicate external ids) are kept out: names the
fuzzers write are unique, since refusing those at write time is a separate
check of its own.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.parse
import uuid

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from aus.server.db import open_database
from tests.support.server_seed import seed
from tests.support.server_state import fingerprint, integrity_problems, scim_listing

REQUESTS = int(os.environ.get("AUS_FUZZ_REQUESTS", "3000"))
HANG_SECONDS = 10.0
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


class Fuzzed:
    """Sends requests, checks each answer, counts them."""

    def __init__(self, server):
        self.server = server
        self.engine, _ = open_database(server.db_url)
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.slowest = 0.0

    def send(self, method: str, url: str, **kw) -> httpx.Response | None:
        c = self.server.client
        try:
            request = c.build_request(method, url, **kw)
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError, ValueError, TypeError):
            return None                   # the client cannot even say it
        before = fingerprint(self.engine, self.server.org) if method in WRITES else None
        t0 = time.monotonic()
        r = c.send(request)
        took = time.monotonic() - t0
        self.sent += 1
        self.slowest = max(self.slowest, took)
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
        shown = f"{method} {url[:300]} -> {r.status_code} {r.text[:300]}"
        assert r.status_code < 500, shown
        assert took < HANG_SECONDS, f"{shown} took {took:.1f} s"
        if before is not None and r.status_code >= 400:
            assert fingerprint(self.engine, self.server.org) == before, f"changed by {shown}"
        return r

    def close(self):
        self.engine.dispose()


def _sentinel(server) -> dict:
    """Org 2's data, which no request of org 1 may touch."""
    ids = seed(server.db_url, "2", groups={"ops": ["root@contoso.com"]})
    return {"ids": ids, "listing": _snapshot(server, "2", server.other_token)}


def _snapshot(server, org: str, token: str) -> tuple:
    users = scim_listing(server.client, org, token, "Users")
    groups = scim_listing(server.client, org, token, "Groups")
    return (sorted(json.dumps(u, sort_keys=True) for u in users),
            sorted(json.dumps(g, sort_keys=True) for g in groups))


def _whole_afterwards(server, sentinel: dict, fz: Fuzzed) -> None:
    c = server.client
    scim_listing(c, server.org, server.token, "Users")
    scim_listing(c, server.org, server.token, "Groups")
    for what in ("groups", "rules", "ip-lists", "workloads", "policy"):
        r = c.get(f"{server.api}/{what}", auth=server.basic())
        assert r.status_code == 200, (what, r.text)
    deadline = time.monotonic() + 10          # the build follows the last write
    while True:
        r = c.get(f"{server.api}/bundle", auth=server.basic())
        if r.status_code == 200:
            json.loads(r.content)
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert _snapshot(server, "2", server.other_token) == sentinel["listing"]
    assert integrity_problems(server.db_url) == []
    print(f"{fz.sent} requests, statuses {dict(sorted(fz.statuses.items()))}, "
          f"slowest {fz.slowest * 1000:.0f} ms")


def _run(strategy, one, n: int) -> None:
    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(item):
        one(item)
    fuzz()


# --------------------------------------------------------------------------
# schemathesis over the OpenAPI document


def _unique_names(case) -> None:
    """Rule and IP-list writes get a name of their own (see the docstring)."""
    if isinstance(case.body, dict) and ("/rules" in case.path or "/ip-lists" in case.path):
        if "name" in case.body or case.method.upper() in ("POST", "PUT"):
            case.body["name"] = "n" + uuid.uuid4().hex[:12]


def test_openapi_fuzz(server):
    sentinel = _sentinel(server)
    seed(server.db_url, server.org, groups={"devs": ["a@contoso.com"]})
    schema = schemathesis.openapi.from_dict(server.client.get("/api/openapi.json").json())
    basic = "Basic " + base64.b64encode(server.token.encode()).decode()
    strategies = []
    for result in schema.get_all_operations():
        op = result.ok()
        params = {"org_id": server.org} if "{org_id}" in op.path else {}
        auth = {"Authorization": basic if op.path.startswith("/api") else f"Bearer {server.token}"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies.append(op.as_strategy(generation_mode=mode, path_parameters=params,
                                             headers=auth))
    fz = Fuzzed(server)

    def one(case):
        _unique_names(case)
        path = case.path
        for k, v in (case.path_parameters or {}).items():
            path = path.replace("{" + k + "}", urllib.parse.quote(str(v), safe=""))
        query = dict(case.query or {})
        if path.endswith("/bundle"):
            query["wait"] = 0                 # a long poll is a wait, not a hang
        kw = {"params": query, "headers": {k: str(v) for k, v in (case.headers or {}).items()}}
        if not isinstance(case.body, type(schemathesis.core.NOT_SET)) and \
                case.body is not schemathesis.core.NOT_SET:
            kw["content"] = json.dumps(case.body) if not isinstance(case.body, (bytes, str)) \
                else case.body
            kw["headers"].setdefault("Content-Type", case.media_type or "application/json")
        fz.send(case.method.upper(), path, **kw)

    try:
        _run(st.one_of(strategies), one, REQUESTS)
        _whole_afterwards(server, sentinel, fz)
    finally:
        fz.close()


# --------------------------------------------------------------------------
# A SCIM fuzzer that knows the grammar

ATTRS = ["userName", "displayName", "title", "active", "id", "externalId", "emails",
         "emails.value", "emails.type", "name.familyName", "name.givenName", "meta.created",
         "meta.lastModified", "members", "members.value", "members.type", "groups",
         "groups.value", f"{ENTERPRISE}:employeeNumber", f"{ENTERPRISE}:manager.value",
         "nickName", "x", "urn:x", "a.b.c", "$ref"]
OPS = ["eq", "ne", "co", "sw", "ew", "gt", "ge", "lt", "le", "EQ", "Pr", "xx"]


def _string_literal() -> st.SearchStrategy[str]:
    plain = st.text(max_size=20).map(json.dumps)
    escaped = st.sampled_from(['"\\udfff"', '"\\ud800x"', '"\\u0000"', '"a\\"b"', '"\\x"',
                               '"2024-05-01T12:00:00Z"', '"work"', '"é"', '"unterminated'])
    return st.one_of(plain, escaped)


def _number_literal() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(-10**30, 10**30).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.sampled_from(["01", "-0", "1e30", "1e999", "9" * 4301, "1.", ".5", "0x10", "1_0"]))


def _value() -> st.SearchStrategy[str]:
    return st.one_of(_string_literal(), _number_literal(),
                     st.sampled_from(["true", "false", "null", "True", "jyoung", "and"]))


def _filters() -> st.SearchStrategy[str]:
    attr = st.one_of(st.sampled_from(ATTRS), st.from_regex(r"[A-Za-z$][A-Za-z0-9.:_-]{0,12}",
                                                           fullmatch=True))
    leaf = st.one_of(
        st.builds(lambda a, o, v: f"{a} {o} {v}", attr, st.sampled_from(OPS), _value()),
        attr.map(lambda a: f"{a} pr"))
    tree = st.recursive(leaf, lambda inner: st.one_of(
        st.builds(lambda a, b, k: f"{a} {k} {b}", inner, inner, st.sampled_from(["and", "or", "AND"])),
        inner.map(lambda a: f"({a})"),
        inner.map(lambda a: f"not ({a})"),
        st.builds(lambda a, f: f"{a}[{f}]", st.sampled_from(["emails", "members", "groups"]), inner),
    ), max_leaves=12)
    hostile = st.one_of(
        st.integers(1, 600).map(lambda n: "(" * n + 'userName eq "a"' + ")" * n),
        st.integers(1, 1500).map(lambda n: " and ".join(["title pr"] * n)),
        st.integers(1, 40).map(lambda n: "not (" * n + "title pr" + ")" * n),
        st.text(alphabet='()[]" andorpreq.:$\\', max_size=60),
        st.text(max_size=40))
    return st.one_of(tree, tree, hostile)


def _json_value(depth=3) -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=10)


def _user_doc() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"schemas": st.sampled_from([[CORE_USER], [CORE_USER, ENTERPRISE], [], ["urn:x"]]),
         "userName": st.one_of(st.text(max_size=30), st.just("alice@contoso.com"), _json_value())},
        optional={"title": _json_value(), "active": st.one_of(st.booleans(), st.text(max_size=5)),
                  "emails": _json_value(), "name": _json_value(), "displayName": st.text(max_size=20),
                  ENTERPRISE: _json_value(), "externalId": st.none(), "meta": _json_value()})


def _patch_doc(ids) -> st.SearchStrategy[dict]:
    path = st.one_of(st.sampled_from(ATTRS), _filters().map(lambda f: f"members[{f}]"),
                     _filters().map(lambda f: f"emails[{f}].value"), st.text(max_size=20))
    member_values = st.lists(st.fixed_dictionaries({"value": st.one_of(st.sampled_from(ids),
                                                                        st.text(max_size=10))}),
                             max_size=4)
    op = st.fixed_dictionaries(
        {"op": st.sampled_from(["add", "replace", "remove", "Add", "REPLACE", "move", ""])},
        optional={"path": path, "value": st.one_of(_json_value(), member_values)})
    return st.fixed_dictionaries({"schemas": st.sampled_from([[PATCH], [], ["urn:x"]]),
                                  "Operations": st.one_of(st.lists(op, max_size=5), _json_value())})


def _raw_bodies() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(1, 200_000).map(lambda n: "[" * n),
        st.sampled_from(['{"userName": NaN}', '{"userName": Infinity}', '{"a": 1e999}',
                         '{"userName": "\\udfff", "schemas": ["%s"]}' % CORE_USER,
                         '{"userName": "a\\u0000b", "schemas": ["%s"]}' % CORE_USER,
                         '{"userName": %s}' % ("9" * 4301), "", "{", "null", "[]", '"x"']),
        st.text(max_size=50))


def _scim_requests(ids: list[str]) -> st.SearchStrategy[tuple]:
    kind = st.sampled_from(["Users", "Groups"])
    rid = st.one_of(st.sampled_from(ids), st.text(min_size=1, max_size=20).map(
        lambda t: urllib.parse.quote(t, safe="")))
    number = st.one_of(st.integers(-2**70, 2**70).map(str), _number_literal(), st.text(max_size=6))
    listing = st.builds(
        lambda k, f, s, c, a: ("GET", f"/{k}", {"filter": f, "startIndex": s, "count": c,
                                                 "attributes": a}, None),
        kind, _filters(), number, number,
        st.one_of(st.none(), st.sampled_from(ATTRS), st.text(max_size=20)))
    get = st.builds(lambda k, i, a: ("GET", f"/{k}/{i}", {"attributes": a}, None), kind, rid,
                    st.one_of(st.none(), st.sampled_from(["meta.created", "userName", "members"])))
    create_user = st.builds(lambda d, a: ("POST", "/Users", {"attributes": a}, d), _user_doc(),
                            st.one_of(st.none(), st.just("meta.created")))
    create_group = st.builds(
        lambda n, m: ("POST", "/Groups", {}, {"schemas": [CORE_GROUP], "displayName": n,
                                              "members": [{"value": v} for v in m]}),
        st.text(max_size=20), st.lists(st.one_of(st.sampled_from(ids), st.text(max_size=8)),
                                       max_size=3))
    patch = st.builds(lambda k, i, d, a: ("PATCH", f"/{k}/{i}", {"attributes": a}, d), kind, rid,
                      _patch_doc(ids), st.one_of(st.none(), st.just("meta.created")))
    put = st.builds(lambda i, d: ("PUT", f"/Users/{i}", {}, d), rid, _user_doc())
    raw = st.builds(lambda m, k, b: (m, f"/{k}", {}, b), st.sampled_from(["POST", "PATCH", "PUT"]),
                    st.one_of(kind, kind.flatmap(lambda k: rid.map(lambda i: f"{k}/{i}"))),
                    _raw_bodies())
    delete = st.builds(lambda k, i: ("DELETE", f"/{k}/{i}", {}, None), kind,
                       st.text(min_size=1, max_size=12).map(lambda t: urllib.parse.quote(t, safe="")))
    return st.one_of(listing, listing, get, create_user, create_group, patch, patch, put, raw,
                     delete)


def test_scim_grammar_fuzz(server):
    sentinel = _sentinel(server)
    ids = list(seed(server.db_url, server.org, users=["a@contoso.com", "b@contoso.com"],
                    groups={"devs": ["a@contoso.com"], "ops": ["b@contoso.com"]}).values())
    fz = Fuzzed(server)
    headers = {**server.bearer(), "Content-Type": "application/scim+json"}

    def one(req):
        method, path, params, body = req
        params = {k: v for k, v in params.items() if v is not None}
        if isinstance(body, dict) and path == "/Groups":
            body["displayName"] = f"{body['displayName']}-{uuid.uuid4().hex[:8]}"
        content = body if isinstance(body, str) or body is None else json.dumps(body)
        fz.send(method, f"{server.scim}{path}", params=params, headers=headers, content=content)

    try:
        _run(_scim_requests(ids), one, REQUESTS)
        _whole_afterwards(server, sentinel, fz)
    finally:
        fz.close()


@pytest.fixture(autouse=True)
def _quiet_bundle_logs(caplog):
    caplog.set_level("WARNING", logger="aus.server")
