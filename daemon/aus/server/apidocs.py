"""``/api/docs``: the management API's reference as one page rendered on
the server from the OpenAPI document, with no script and nothing loaded
from elsewhere (FastAPI's default page pulls Swagger UI from a CDN, which
would run third-party code on the server's origin, next to API keys).
The machine-readable document stays at ``/api/openapi.json``."""

from __future__ import annotations

import json
from html import escape

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from .intake import InputGate

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
METHODS = ("get", "put", "post", "patch", "delete")

# How an API key (``<key id>:<secret>``) is sent: SCIM takes it as a
# Bearer token only (what Entra ID sends); the management API and the
# bundle take Bearer or Basic (user: the key id, password: the secret).
SECURITY_SCHEMES = {
    "apiKeyBearer": {
        "type": "http", "scheme": "bearer", "bearerFormat": "<key id>:<secret>",
        "description": "An API key as `Authorization: Bearer <key id>:<secret>` "
                       "(made by `aus-server api-key create`).",
    },
    "apiKeyBasic": {
        "type": "http", "scheme": "basic",
        "description": "An API key as HTTP Basic credentials: the key id as the user name, "
                       "the secret as the password.",
    },
}
SCIM_SECURITY = [{"apiKeyBearer": []}]
API_SECURITY = [{"apiKeyBearer": []}, {"apiKeyBasic": []}]


def declare_security(doc: dict) -> dict:
    """Add the security schemes and each operation's requirement to an
    OpenAPI document. Which paths need a key is what the request gate
    enforces (:meth:`InputGate._org`), so the document cannot say
    otherwise; every other operation declares that it needs none."""
    doc.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for path, item in doc.get("paths", {}).items():
        if InputGate._org(path) is None:
            security = []
        elif path.startswith("/scim/"):
            security = SCIM_SECURITY
        else:
            security = API_SECURITY
        for method in METHODS:
            if method in item:
                item[method]["security"] = security
    return doc


def _schema_name(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items', {}))}"
    if "anyOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["anyOf"])
    return schema.get("type", "any")


def _operation(path: str, method: str, op: dict) -> str:
    out = [f'<section id="{escape(op.get("operationId", method + path))}">',
           f"<h3><code>{method.upper()} {escape(path)}</code></h3>"]
    if op.get("summary"):
        out.append(f"<p>{escape(op['summary'])}</p>")
    if op.get("description"):
        out.append(f"<pre>{escape(op['description'])}</pre>")
    params = op.get("parameters", [])
    schemes = [name for req in op.get("security", []) for name in req]
    out.append(f"<p>Credentials: {escape(' or '.join(schemes)) if schemes else 'none'}</p>")
    if params:
        out.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>required</th></tr>")
        for p in params:
            out.append(f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p['in'])}</td>"
                       f"<td>{escape(_schema_name(p.get('schema', {})))}</td>"
                       f"<td>{'yes' if p.get('required') else 'no'}</td></tr>")
        out.append("</table>")
    body = op.get("requestBody", {}).get("content", {}).get("application/json")
    if body:
        out.append(f"<p>Body: <a href=\"#schema-{escape(_schema_name(body['schema']))}\">"
                   f"{escape(_schema_name(body['schema']))}</a></p>")
    responses = ", ".join(f"{escape(code)} {escape(r.get('description', ''))}"
                          for code, r in op.get("responses", {}).items())
    out.append(f"<p>Responses: {responses}</p></section>")
    return "\n".join(out)


def render(doc: dict) -> str:
    info = doc.get("info", {})
    parts = ["<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{escape(info.get('title', 'API'))} API reference</title></head><body>",
             f"<h1>{escape(info.get('title', 'API'))} {escape(info.get('version', ''))}</h1>",
             '<p>Machine-readable: <a href="/api/openapi.json">/api/openapi.json</a>.</p>',
             "<h2>Operations</h2>"]
    for path, item in doc.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                parts.append(_operation(path, method, item[method]))
    parts.append("<h2>Schemas</h2>")
    for name, schema in doc.get("components", {}).get("schemas", {}).items():
        parts.append(f'<h3 id="schema-{escape(name)}">{escape(name)}</h3>'
                     f"<pre>{escape(json.dumps(schema, indent=2, ensure_ascii=False))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def install(app: FastAPI) -> None:
    page: list[str] = []
    generate = app.openapi

    def openapi() -> dict:
        # FastAPI builds the document once and keeps it; declared once too.
        doc = generate()
        if "securitySchemes" not in doc.get("components", {}):
            declare_security(doc)
        return doc

    app.openapi = openapi

    @app.get("/api/docs", include_in_schema=False)
    def api_docs() -> HTMLResponse:
        if not page:
            page.append(render(app.openapi()))
        return HTMLResponse(page[0], headers=HEADERS)
