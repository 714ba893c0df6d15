"""How aus-server serves the console's files (no browser needed)."""

from __future__ import annotations

import httpx

from aus.server.console import ROOT


def test_page_and_assets_are_served_with_a_strict_policy(aus_server):
    r = httpx.get(aus_server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="/console/app.js">' in r.text
    # Every file the page and its modules name is there, with a JavaScript
    # type for the modules (browsers refuse modules served as anything else).
    for f in sorted(ROOT.iterdir()):
        a = httpx.get(f"{aus_server.url}/console/{f.name}")
        assert a.status_code == 200, f.name
        assert a.headers["content-security-policy"] == csp
        if f.suffix == ".js":
            assert "javascript" in a.headers["content-type"], (f.name, a.headers["content-type"])
            for line in a.text.splitlines():
                if line.startswith("import "):
                    target = line.rsplit('"./', 1)[1].split('"')[0]
                    assert (ROOT / target).is_file(), (f.name, target)
    assert httpx.get(aus_server.url + "/console/nothing-here.js").status_code == 404
    # The API next to it is unchanged: JSON errors, not pages.
    r = httpx.get(aus_server.url + "/api/whoami")
    assert r.status_code == 401 and r.json()["error"]["status"] == 401
