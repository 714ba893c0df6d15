"""`/api/docs` is the API reference without any script: every operation of
the OpenAPI document, nothing loaded from another origin."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from aus.server.app import create_app


def test_api_docs_serve_no_script_and_list_every_operation(tmp_path):
    app = create_app(f"sqlite:///{tmp_path}/s.db")
    with TestClient(app) as client:
        r = client.get("/api/docs")
        doc = client.get("/api/openapi.json").json()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert not re.search(r"<\s*script", page, re.I), "a script on the docs page"
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), "an external resource"
    assert not re.search(r"\son\w+\s*=", page, re.I), "an inline event handler"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    ops = [(m.upper(), p) for p, item in doc["paths"].items() for m in item
           if m in ("get", "put", "post", "patch", "delete")]
    assert len(ops) > 10
    for method, path in ops:
        assert f"<code>{method} {path}</code>" in page, (method, path)
    assert '<a href="/api/openapi.json">' in page
