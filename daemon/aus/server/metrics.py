"""``GET /metrics``: the server's counters in the Prometheus text format.

What is counted (names and labels in docs/metrics-server.md):

- every HTTP request, by method, route *template* (``/api/orgs/{org_id}/bundle``,
  never the raw path: an org id or a SCIM resource id in a label would make
  one series per value) and status; its duration as a histogram per route;
- SCIM operations by resource, method and outcome;
- bundle builds (duration, failures), each org's bundle version and build
  time (one series per org: orgs are created by the operator, so bounded),
  and the long-polls held open right now;
- flow batches and records ingested.

Several workers (``aus-server serve --workers N``) share one listening
socket, so a scrape reaches any one of them. The CLI then gives them a
``PROMETHEUS_MULTIPROC_DIR``: every worker writes its counters there and
whichever answers the scrape sums them all, so the numbers never jump
between workers. Per-org bundle gauges are read from the answering
worker's bundle service at scrape time; every worker serves the same
bundles from the shared database.

No authentication by default (like ``/healthz``); with a token
(``--metrics-token-file``) a scrape must send ``Authorization: Bearer
<token>``.
"""

from __future__ import annotations

import contextlib
import glob
import hmac
import os
import shutil
import tempfile
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "unmatched"   # the route label of a request no route took

# Metric objects live in this registry, not prometheus_client's global one:
# nothing else in the process (a library, a test) adds series to the scrape.
REGISTRY = CollectorRegistry()
if not os.environ.get(MULTIPROC_ENV):
    # A process's CPU and memory mean something for one process only.
    ProcessCollector(registry=REGISTRY)

# Seconds. Long-polls are held up to the server's max wait (60 s by
# default), so the buckets reach past it; everything else is fast.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)

REQUESTS = Counter("aus_server_http_requests", "HTTP requests answered",
                   ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("aus_server_http_request_duration_seconds",
                    "Time from a request's arrival to the end of its response",
                    ["method", "route"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
SCIM_OPERATIONS = Counter("aus_server_scim_operations", "SCIM requests by resource and outcome",
                          ["resource", "method", "outcome"], registry=REGISTRY)
BUILD_SECONDS = Histogram("aus_server_bundle_build_duration_seconds",
                          "Time to build one org's bundle (built, whether or not it changed)",
                          registry=REGISTRY)
BUILD_FAILURES = Counter("aus_server_bundle_build_failures",
                         "Bundle builds the daemon's model refused or that broke",
                         registry=REGISTRY)
LONG_POLLS = Gauge("aus_server_bundle_long_polls", "Bundle long-polls held open now",
                   registry=REGISTRY, multiprocess_mode="livesum")
BUNDLE_ANSWERS = Counter("aus_server_bundle_answers",
                         "Bundles sent (200s of the bundle endpoint), by kind (full or delta) "
                         "and encoding (gzip or identity)", ["kind", "encoding"],
                         registry=REGISTRY)
BUNDLE_BYTES = Counter("aus_server_bundle_sent_bytes",
                       "Bytes of bundle bodies sent, as on the wire, by kind (full or delta)",
                       ["kind"], registry=REGISTRY)
FLOW_BATCHES = Counter("aus_server_flow_batches", "Flow batches stored", registry=REGISTRY)
FLOW_RECORDS = Counter("aus_server_flow_records",
                       "Flow records received in stored batches, by outcome "
                       "(accepted, or expired: older than the retention keeps)",
                       ["outcome"], registry=REGISTRY)

SCIM_PREFIX = "/scim/orgs/{org_id}/"
SCIM_RESOURCES = ("Users", "Groups", "ServiceProviderConfig", "ResourceTypes", "Schemas")


def scim_outcome(status: int) -> str:
    """A SCIM response's status as a small fixed set of outcomes."""
    if status < 400:
        return "success"
    return {401: "denied", 403: "denied", 404: "not_found", 409: "conflict",
            412: "precondition_failed", 413: "too_large", 429: "rate_limited"}.get(
        status, "invalid" if status < 500 else "error")


def _scim_resource(route: str) -> str:
    first = route[len(SCIM_PREFIX):].split("/", 1)[0]
    return first if first in SCIM_RESOURCES else "other"


def _leaf_routes(routes) -> list:  # noqa: ANN001 - a router's routes
    """Every route that serves requests, in matching order: FastAPI keeps
    an included router as one entry holding the router's own routes."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out.extend(_leaf_routes(inner.routes) if inner is not None else [route])
    return out


def _route_of(leaves: list, scope: Scope) -> str:
    """The template of the route that took the request. A request refused
    before routing (the input gate) is matched here, on that path only."""
    route = scope.get("route")
    if route is None:
        for candidate in leaves:
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                route = candidate
                break
    return getattr(route, "path", None) or UNMATCHED


class RequestMetrics:
    """Outermost ASGI middleware: counts and times every HTTP request."""

    def __init__(self, app: ASGIApp, *, fastapi_app: FastAPI):
        self.app = app
        self.fastapi_app = fastapi_app
        self._leaves: list | None = None   # the app's routes, once they are all added

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500   # an exception with no response sent is answered 500
        counted = False

        def count() -> None:
            nonlocal counted
            if counted:
                return
            counted = True
            method = scope["method"]
            if method not in _METHODS:
                method = "other"   # any token is a method: keep the label bounded
            if self._leaves is None:
                self._leaves = _leaf_routes(self.fastapi_app.router.routes)
            route = _route_of(self._leaves, scope)
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - start)
            if route.startswith(SCIM_PREFIX):
                SCIM_OPERATIONS.labels(_scim_resource(route), method, scim_outcome(status)).inc()

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Counted before the last byte leaves: a client that has its
                # answer finds the request in the next scrape.
                count()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            count()   # no complete response: an error, or the client left


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BundleCollector:
    """Each org's bundle version and build time, as the bundle service of
    the answering process serves them (read at scrape time, so an org's
    series is always its current bundle)."""

    def __init__(self, bundles):  # noqa: ANN001 - a bundle.BundleService
        self.bundles = bundles

    def collect(self):
        version = GaugeMetricFamily("aus_server_bundle_version",
                                    "Version of the bundle served to the org's workloads",
                                    labels=["org"])
        built = GaugeMetricFamily("aus_server_bundle_built_timestamp_seconds",
                                  "When the org's bundle in force was built (Unix time)",
                                  labels=["org"])
        for org, cur in sorted(self.bundles.served().items()):
            version.add_metric([org], cur.version)
            if cur.built_at is not None:
                built.add_metric([org], cur.built_at)
        yield version
        yield built


def _forget_dead_workers(path: str) -> None:
    """Live gauges (long-polls) of a worker that died are not live: drop
    its files, as a supervisor calling ``mark_process_dead`` would."""
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        try:
            pid = int(name.rsplit("_", 1)[1][:-3])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            continue   # alive, another user's


def exposition(bundles) -> bytes:  # noqa: ANN001 - a bundle.BundleService
    """The text a scrape gets."""
    per_scrape = CollectorRegistry()
    per_scrape.register(BundleCollector(bundles))
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return generate_latest(REGISTRY) + generate_latest(per_scrape)
    _forget_dead_workers(path)
    multiprocess.MultiProcessCollector(per_scrape, path)
    return generate_latest(per_scrape)


@contextlib.contextmanager
def multiprocess_dir(workers: int):
    """Where several workers keep their metrics, so a scrape answered by any
    one of them sums all (prometheus-client's multiprocess mode): the
    operator's $PROMETHEUS_MULTIPROC_DIR, emptied first as that mode needs,
    else a private directory removed at exit."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.unlink(stale)
        yield given
        return
    if workers <= 1:
        yield None
        return
    path = tempfile.mkdtemp(prefix="aus-server-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(path, ignore_errors=True)


def install(app: FastAPI, token: str | None = None) -> None:
    """Count every request and serve ``GET /metrics`` (behind ``token``
    when one is given)."""

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        if token is not None:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    value.strip().encode(), token.encode()):
                return JSONResponse(
                    {"error": {"status": 401, "message": "/metrics needs the metrics token "
                                                         "as 'Authorization: Bearer <token>'",
                               "fields": []}},
                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
        return Response(exposition(request.app.state.bundles), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestMetrics, fastapi_app=app)
