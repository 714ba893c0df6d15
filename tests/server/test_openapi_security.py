"""The OpenAPI document declares how API keys are sent and which
operations need one, and the server does what it declares: every
operation that declares a scheme refuses a request without credentials
(401) and accepts a key sent by each declared scheme; SCIM refuses Basic,
which it does not declare; an operation declaring none answers without
credentials. `/api/docs` loads nothing from another origin."""

from __future__ import annotations

import base64
import re

import pytest
from fastapi.testclient import TestClient

from aus.server.app import create_app
from aus.server.auth import create_key
from aus.server.db import open_database

METHODS = ("get", "put", "post", "patch", "delete")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('openapi')}/s.db"
    engine, sessions = open_database(url)
    token = create_key(sessions, "1")
    engine.dispose()
    with TestClient(create_app(url, bundle_interval=0.05, max_wait=1)) as client:
        yield client, token, client.get("/api/openapi.json").json()


def operations(doc: dict) -> list[tuple[str, str, dict]]:
    return [(method, path, item[method]) for path, item in doc["paths"].items()
            for method in METHODS if method in item]


def concrete(path: str) -> str:
    return re.sub(r"\{org_id\}", "1", re.sub(r"\{(?!org_id)[^}]+\}", "x", path))


def headers(scheme: str, token: str) -> dict:
    if scheme == "apiKeyBasic":
        return {"Authorization": "Basic " + base64.b64encode(token.encode()).decode()}
    return {"Authorization": f"Bearer {token}"}


def test_the_schemes_are_http_bearer_and_basic(site):
    _, _, doc = site
    schemes = doc["components"]["securitySchemes"]
    assert schemes["apiKeyBearer"]["type"] == "http" and schemes["apiKeyBearer"]["scheme"] == "bearer"
    assert schemes["apiKeyBasic"]["type"] == "http" and schemes["apiKeyBasic"]["scheme"] == "basic"
    assert "security" not in doc, "a global requirement: each operation states its own"


def test_every_operation_states_its_requirement(site):
    _, _, doc = site
    ops = operations(doc)
    assert len(ops) > 30
    for method, path, op in ops:
        assert "security" in op, (method, path)
        names = sorted(name for req in op["security"] for name in req)
        if path.startswith("/scim/orgs/"):
            assert names == ["apiKeyBearer"], (method, path)
        elif path.startswith("/api/orgs/") or path == "/api/whoami":
            assert names == ["apiKeyBasic", "apiKeyBearer"], (method, path)
        for req in op["security"]:
            assert all(req[name] == [] for name in req)   # HTTP schemes take no scopes


def test_the_server_enforces_what_the_document_declares(site):
    client, token, doc = site
    for method, path, op in operations(doc):
        url = concrete(path)
        bare = client.request(method.upper(), url)
        declared = {name for req in op["security"] for name in req}
        if not declared:
            assert bare.status_code != 401, (method, path, bare.text)
            continue
        assert bare.status_code == 401, (method, path, bare.status_code, bare.text)
        for scheme in ("apiKeyBearer", "apiKeyBasic"):
            r = client.request(method.upper(), url, headers=headers(scheme, token))
            if scheme in declared:
                assert r.status_code not in (401, 403), (method, path, scheme, r.text)
            else:
                assert r.status_code == 401, (method, path, scheme, r.status_code)


def test_api_docs_name_the_credentials_and_load_nothing_from_elsewhere(site):
    client, _, doc = site
    r = client.get("/api/docs")
    assert r.status_code == 200
    page = r.text
    # No asset of another origin: no absolute or scheme-relative URL in any
    # attribute or style, nor an @import.
    assert not re.search(r"""(src|href|action|srcset|poster|data)\s*=\s*["']?\s*(\w+:)?//""",
                         page, re.I)
    assert not re.search(r"""url\(\s*["']?\s*(\w+:)?//|@import""", page, re.I)
    assert not re.search(r"<\s*(script|link|iframe|object|embed|img)\b", page, re.I)
    assert "default-src 'none'" in r.headers["content-security-policy"]
    scim_ops = [op for _, path, op in operations(doc) if path.startswith("/scim/orgs/")]
    assert scim_ops and page.count("<p>Credentials: apiKeyBearer</p>") == len(scim_ops)
    assert "<p>Credentials: apiKeyBearer or apiKeyBasic</p>" in page
