"""/healthz, /readyz and /metrics against the real server: readiness
follows a real PostgreSQL stopped and started again, and /metrics is read
with Prometheus's own text parser."""

from __future__ import annotations

import contextlib
import glob
import http.client
import os
import signal
import subprocess
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from aus.server.app import create_app
from aus.server.auth import create_key
from aus.server.db import open_database
from aus.server.health import DB_TIMEOUT
from tests.support.flow_posts import batch, post, record
from tests.support.names import free_port
from tests.support.polling import wait_until
from tests.support.postgres import PostgresServer
from tests.support.server_process import CLI, serving, wait_port

REQUESTS = "aus_server_http_requests_total"
SCIM_OPS = "aus_server_scim_operations_total"


def scrape(client: TestClient, **kw) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    r = client.get("/metrics", **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, what: str, timeout: float = 15.0):
    return wait_until(predicate, timeout, what=what)


def test_healthz_needs_nothing(server):
    r = server.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_ready(server):
    r = server.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "checks": {"database": {"ok": True},
                                                   "bundle_service": {"ok": True}}}


def test_readyz_names_a_stopped_bundle_service(server):
    server.client.portal.call(server.client.app.state.bundles.stop)
    r = server.client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == {"ok": True}
    assert body["checks"]["bundle_service"]["ok"] is False
    assert "bundle service" in body["checks"]["bundle_service"]["error"]
    assert server.client.get("/healthz").status_code == 200   # alive, just not ready


def test_readyz_follows_the_database():
    """The test's own PostgreSQL goes away and comes back; /readyz says so."""
    pg = PostgresServer().start()
    try:
        url = pg.url(pg.new_database())
        app = create_app(url, bundle_interval=0.05, max_wait=5)
        with TestClient(app) as client:
            assert client.get("/readyz").status_code == 200
            pg.halt()
            r = client.get("/readyz")
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["status"] == "unavailable"
            assert body["checks"]["database"]["ok"] is False
            assert body["checks"]["database"]["error"]   # the driver's reason
            assert body["checks"]["bundle_service"] == {"ok": True}
            assert client.get("/healthz").status_code == 200
            pg.resume()
            # The pool's connections died with the server; the first probe
            # after the restart must not report them as the database.
            r = client.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["checks"]["database"] == {"ok": True}
            # A database that accepts connections and never answers: the
            # probe answers 503 within its timeout instead of hanging.
            with _frozen(pg):
                t0 = time.monotonic()
                r = client.get("/readyz")
                assert r.status_code == 503, r.text
                assert time.monotonic() - t0 < DB_TIMEOUT + 2
                assert "no answer to SELECT 1" in r.json()["checks"]["database"]["error"]
            wait_for(lambda: client.get("/readyz").status_code == 200, "ready after the thaw")
    finally:
        try:
            pg.halt()   # fast: a smart shutdown would wait for every client to leave
        finally:
            pg.stop()


@contextlib.contextmanager
def _frozen(pg: PostgresServer):
    """SIGSTOP the test's own PostgreSQL: its postmaster and every backend."""
    with open(f"{pg.data}/postmaster.pid") as f:
        postmaster = int(f.readline())
    with open(f"/proc/{postmaster}/task/{postmaster}/children") as f:
        pids = [postmaster] + [int(p) for p in f.read().split()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        # runuser stops itself when its child stops, and waits for a SIGCONT.
        os.kill(pg.proc.pid, signal.SIGCONT)


def test_requests_are_counted_by_route_template(server):
    c = server.client
    route = "/api/orgs/{org_id}/whoami"
    before = scrape(c)
    assert c.get(f"{server.api}/whoami", headers=server.bearer()).status_code == 200
    assert c.get(f"{server.api}/whoami").status_code == 401
    after = scrape(c)
    assert value(after, REQUESTS, method="GET", route=route, status="200") == \
        value(before, REQUESTS, method="GET", route=route, status="200") + 1
    assert value(after, REQUESTS, method="GET", route=route, status="401") == \
        value(before, REQUESTS, method="GET", route=route, status="401") + 1
    hist = "aus_server_http_request_duration_seconds"
    assert value(after, hist + "_count", method="GET", route=route) == \
        value(before, hist + "_count", method="GET", route=route) + 2
    assert value(after, hist + "_bucket", method="GET", route=route, le="+Inf") == \
        value(after, hist + "_count", method="GET", route=route)
    assert value(after, hist + "_sum", method="GET", route=route) > 0
    # No raw path in any label: an org id or a resource id never becomes a series.
    routes = {dict(labels)["route"] for (name, labels) in after if name == REQUESTS}
    assert route in routes
    assert not [r for r in routes if "/orgs/1" in r or "/orgs/2" in r], routes
    # A path no route serves is counted, under one label.
    c.get(f"/nothing/here/{time.time_ns()}")
    last = scrape(c)
    assert value(last, REQUESTS, method="GET", route="unmatched", status="404") >= 1
    assert not [r for (n, ls) in last if n == REQUESTS
                for r in [dict(ls)["route"]] if r.startswith("/nothing")]


def test_scim_operations_are_counted(server):
    c = server.client
    user = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "metrics.alice",
            "active": True}
    ok = dict(resource="Users", method="POST", outcome="success")
    conflict = dict(resource="Users", method="POST", outcome="conflict")
    before = scrape(c)
    assert c.post(f"{server.scim}/Users", json=user, headers=server.bearer()).status_code == 201
    assert c.post(f"{server.scim}/Users", json=user, headers=server.bearer()).status_code == 409
    after = scrape(c)
    assert value(after, SCIM_OPS, **ok) == value(before, SCIM_OPS, **ok) + 1
    assert value(after, SCIM_OPS, **conflict) == value(before, SCIM_OPS, **conflict) + 1
    route = "/scim/orgs/{org_id}/Users"
    assert value(after, REQUESTS, method="POST", route=route, status="201") == \
        value(before, REQUESTS, method="POST", route=route, status="201") + 1


def test_refusals_before_routing_keep_the_route_template(server):
    """The input gate answers an unauthenticated upload before any route
    runs; the request is still counted under its route's template."""
    c = server.client
    route = "/scim/orgs/{org_id}/Users"
    denied = dict(resource="Users", method="POST", outcome="denied")
    before = scrape(c)
    r = c.post(f"{server.scim}/Users", json={"userName": "nobody"})
    assert r.status_code == 401
    after = scrape(c)
    assert value(after, REQUESTS, method="POST", route=route, status="401") == \
        value(before, REQUESTS, method="POST", route=route, status="401") + 1
    assert value(after, SCIM_OPS, **denied) == value(before, SCIM_OPS, **denied) + 1


def test_bundle_version_is_the_orgs_current_one(server):
    c = server.client
    r = c.get(f"{server.api}/bundle", headers=server.bearer())
    assert r.status_code == 200, r.text
    version = int(r.headers["X-Aus-Version"])
    samples = scrape(c)
    assert value(samples, "aus_server_bundle_version", org="1") == version
    built = value(samples, "aus_server_bundle_built_timestamp_seconds", org="1")
    assert time.time() - 600 < built <= time.time() + 1
    assert value(samples, "aus_server_bundle_build_duration_seconds_count") >= 1


def test_long_poll_gauge_follows_held_polls(server):
    c = server.client
    gauge = "aus_server_bundle_long_polls"
    etag = c.get(f"{server.api}/bundle", headers=server.bearer()).headers["ETag"]
    base = value(scrape(c), gauge)
    answers = []
    poll = threading.Thread(target=lambda: answers.append(c.get(
        f"{server.api}/bundle", params={"wait": 3},
        headers={**server.bearer(), "If-None-Match": etag})))
    poll.start()
    try:
        wait_for(lambda: value(scrape(c), gauge) == base + 1, "the held poll in the gauge")
    finally:
        poll.join(10)
    assert answers and answers[0].status_code == 304
    assert value(scrape(c), gauge) == base


def test_flow_batches_are_counted(server):
    c = server.client
    before = scrape(c)
    r = post(server, batch([record(port=p) for p in (443, 444, 445)]))
    assert r.status_code == 200, r.text
    after = scrape(c)
    assert value(after, "aus_server_flow_batches_total") == \
        value(before, "aus_server_flow_batches_total") + 1
    assert value(after, "aus_server_flow_records_total", outcome="accepted") == \
        value(before, "aus_server_flow_records_total", outcome="accepted") + r.json()["accepted"]


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path}/aus-server.db"
    engine, sessions = open_database(url)
    create_key(sessions, "1")
    engine.dispose()
    return url


def test_metrics_token(sqlite_url):
    app = create_app(sqlite_url, bundle_interval=0.05, max_wait=5, metrics_token="s3cret-token")
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            r = c.get("/metrics", headers=headers)
            assert r.status_code == 401, headers
            assert "metrics token" in r.json()["error"]["message"]
        assert scrape(c, headers={"Authorization": "Bearer s3cret-token"})
        # The probes stay open: an orchestrator has no token.
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200


def _get(port: int, path: str, headers: dict | None = None,
         header: str | None = None) -> tuple[int, str]:
    """One GET on a connection of its own, so whichever worker accepts
    first answers it: the status and the body (or the ``header``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        body = r.read().decode()
        return r.status, r.getheader(header) if header else body
    finally:
        conn.close()


def _samples(port: int) -> dict:
    status, body = _get(port, "/metrics")
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body) for s in f.samples}


def _workers(proc) -> list[int]:
    """The worker processes of the ``aus-server serve`` run as ``proc``."""
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    workers = []
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            workers.append(pid)
    return workers


@contextlib.contextmanager
def _paused(pid: int):
    """Stop one worker (of a server this test started), so the other
    accepts every connection meanwhile. Kept short: the supervisor
    replaces a worker silent for 5 s."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_workers_share_their_counts(postgres, tmp_path, monkeypatch):
    """With --workers 2, a scrape answered by either worker counts the
    requests both served, and a long-poll held by the other one."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))   # where the server makes its metrics directory
    name = postgres.new_database()
    try:
        db = postgres.url(name)
        token = subprocess.run(CLI + ["api-key", "create", "--org", "1", "--db", db], check=True,
                               capture_output=True, text=True).stdout.strip()
        auth = {"Authorization": f"Bearer {token}"}
        port = free_port()
        with serving("--listen", f"127.0.0.1:{port}", "--db", db, "--workers", "2",
                     "--log-level", "WARNING") as proc:
            wait_port(port, proc)
            workers = wait_for(lambda: len(_workers(proc)) == 2 and _workers(proc), "two workers")
            wait_for(lambda: _get(port, "/readyz")[0] == 200, "ready")
            [metrics_dir] = glob.glob(str(tmp_path / "aus-server-metrics-*"))

            def healthz_count() -> float:
                return value(_samples(port), REQUESTS, method="GET", route="/healthz",
                             status="200")

            base = healthz_count()
            # 20 requests to each worker; then each worker answers a scrape.
            for one in workers:
                with _paused(one):
                    for _ in range(20):
                        assert _get(port, "/healthz")[0] == 200
            for one, other in (workers, workers[::-1]):
                with _paused(other):
                    assert healthz_count() == base + 40, f"worker {one}"

            gauge = "aus_server_bundle_long_polls"
            _, etag = _get(port, "/api/orgs/1/bundle", auth, header="ETag")
            answers = []
            poll = threading.Thread(target=lambda: answers.append(_get(
                port, "/api/orgs/1/bundle?wait=4", {**auth, "If-None-Match": etag})))
            try:
                with _paused(workers[0]):   # the poll goes to the second worker ...
                    poll.start()
                    wait_for(lambda: value(_samples(port), gauge) == 1, "the held poll counted")
                with _paused(workers[1]):   # ... and the first one counts it too
                    assert value(_samples(port), gauge) == 1
            finally:
                poll.join(15)
            assert answers and answers[0][0] == 304
            assert value(_samples(port), gauge) == 0
        assert not os.path.exists(metrics_dir)   # removed when the server stops
    finally:
        postgres.drop_database(name)


def test_serve_puts_metrics_behind_the_token_file(tmp_path):
    token_file = tmp_path / "metrics-token"
    token_file.write_text("t0ken-from-a-file\n")
    db = f"sqlite:///{tmp_path}/s.db"
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", db, "--metrics-token-file",
                 str(token_file), "--log-level", "WARNING") as proc:
        wait_port(port, proc)
        assert _get(port, "/metrics")[0] == 401
        status, body = _get(port, "/metrics", {"Authorization": "Bearer t0ken-from-a-file"})
        assert status == 200 and "aus_server_http_requests_total" in body
        assert _get(port, "/healthz")[0] == 200


@pytest.mark.parametrize("content", [None, "  \n"])
def test_serve_refuses_a_missing_or_empty_token_file(tmp_path, content):
    token_file = tmp_path / "metrics-token"
    if content is not None:
        token_file.write_text(content)
    p = subprocess.run(CLI + ["serve", "--db", f"sqlite:///{tmp_path}/s.db", "--listen",
                              f"127.0.0.1:{free_port()}", "--metrics-token-file", str(token_file)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert f"metrics token file {token_file}" in p.stderr
    assert ("empty" if content else "No such file") in p.stderr
