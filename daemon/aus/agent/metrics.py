"""ausd's Prometheus metrics, read from the kernel's maps when scraped.

:class:`Collector` computes nothing until asked: at each scrape (or
textfile write) it reads the per-CPU counter maps (decisions by hook and
reason, per-rule counters, the flow-event counters) and the daemon's
model of what its maps hold (entries per map, users), which the main
loop replaces whole and never edits, so a scrape reads one consistent
state without a lock. The only work done when nobody scrapes is
:class:`LoginLatency`'s bucket count, once per login.

:class:`Exporter` serves them on ``metrics_listen`` (one HTTP server in
its own thread; a slow or stuck scraper holds that thread only) and/or
rewrites ``metrics_textfile`` for node-exporter every
``metrics_interval`` seconds (another thread; write, then rename). The
main loop never waits for either. Metric names and labels are listed in
docs/metrics.md.
"""

from __future__ import annotations

import bisect
import ctypes
import http.server
import logging
import os
import socket
import socketserver
import threading
import time
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from .. import __version__
from ..core import contract as C
from ..core.errors import AusError

log = logging.getLogger(__name__)

# Rules with their own series, lowest ids first; the counters of the rest
# are summed under rule="(other)". Bounds the per-rule series at
# 4 x (RULE_SERIES + 2) whatever max_rules is.
RULE_SERIES = 500
OTHER_RULE = "(other)"
NO_RULE = "(none)"

# Seconds from ``session open`` to the user's rules in the kernel.
LOGIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0)

# The maps whose fill is reported, and how many entries each holds in the
# daemon's model (KernelState).
FILLED_MAPS = {
    C.MAP_USERS: lambda ks: len(ks.users),
    C.MAP_DST: lambda ks: sum(len(e) for e in ks.rulesets.values()),
    C.MAP_SVC: lambda ks: sum(len(p) for p in ks.portsets.values()),
    C.MAP_RULES: lambda ks: len(ks.rules),
}


class LoginLatency:
    """A histogram of login latencies, counted by the main loop and read
    by the scrape thread (a lock held for a few instructions by each)."""

    def __init__(self, buckets: tuple[float, ...] = LOGIN_BUCKETS):
        self.buckets = buckets
        self._lock = threading.Lock()
        self._counts = [0] * (len(buckets) + 1)    # the last is +Inf
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative (upper bound, count) pairs, +Inf last, and the sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, n in zip([*map(str, self.buckets), "+Inf"], counts):
            running += n
            out.append((bound, running))
        return out, total


def _percpu_sum(values) -> int:
    return sum(v.value for v in values) if values else 0


class Collector:
    """A prometheus-client collector over a running Daemon (ausd.py)."""

    def __init__(self, daemon):
        self.d = daemon
        self.errors = 0

    def describe(self):
        return []   # no describe at registration: nothing is read until a scrape

    def collect(self):
        d = self.d
        yield _gauge("ausd_info", "ausd's version (always 1)", 1, version=__version__)
        yield _gauge("ausd_start_time_seconds", "When this ausd started (Unix time)",
                     d.started)
        parts = [self._policy, self._users_and_maps, self._bundle, self._logins, self._dns]
        if d.loaded is not None and d.loaded.maps:
            parts[1:1] = [self._decisions, self._rules, self._events]
        for part in parts:
            try:
                yield from part()
            except AusError as exc:   # a map read failed: the rest still reports
                self.errors += 1
                log.warning("metrics: %s", exc)
        yield CounterMetricFamily("ausd_metrics_errors", "Scrapes that failed to read "
                                  "a map (see the log)", value=self.errors)

    def _maps(self):
        return self.d.loaded.maps

    def _decisions(self):
        m = self._maps()[C.MAP_REASONS]
        fam = CounterMetricFamily("ausd_decisions", "Decisions taken by the kernel "
                                  "programs, by hook and reason", labels=["hook", "reason"])
        for hook in C.Hook:
            for reason in C.Reason:
                if reason == C.Reason.NONE:
                    continue
                n = _percpu_sum(m.lookup(ctypes.c_uint32(hook * C.REASON_MAX + reason)))
                fam.add_metric([hook.name.lower(), reason.name.lower()], n)
        yield fam

    def _rules(self):
        m = self._maps()[C.MAP_RULE_STATS]
        names = dict(self.d.kstate.rules)
        ids = sorted(names)
        own, rest = [C.RULE_NONE, *ids[:RULE_SERIES]], ids[RULE_SERIES:]
        packets = CounterMetricFamily(
            "ausd_rule_packets", "Packets (connect() and sendmsg() calls for denials) "
            f"counted per rule; rule_id 0 is no rule, rules past the first {RULE_SERIES} "
            f"are summed as {OTHER_RULE}", labels=["rule_id", "rule", "verdict"])
        nbytes = CounterMetricFamily("ausd_rule_bytes", "Bytes counted per rule",
                                     labels=["rule_id", "rule", "verdict"])

        def read(rid: int) -> list[int]:
            v = m.lookup(ctypes.c_uint32(rid)) or []
            return [sum(getattr(c, f) for c in v) for f in
                    ("allowed_packets", "allowed_bytes", "denied_packets", "denied_bytes")]

        def add(labels: list[str], c: list[int]) -> None:
            packets.add_metric([*labels, "allowed"], c[0])
            nbytes.add_metric([*labels, "allowed"], c[1])
            packets.add_metric([*labels, "denied"], c[2])
            nbytes.add_metric([*labels, "denied"], c[3])

        for rid in own:
            add([str(rid), names.get(rid, NO_RULE) if rid else NO_RULE], read(rid))
        if rest:
            sums = [0, 0, 0, 0]
            for rid in rest:
                sums = [a + b for a, b in zip(sums, read(rid))]
            add(["", OTHER_RULE], sums)
        yield packets
        yield nbytes

    def _events(self):
        m = self._maps()[C.MAP_STATS]
        for stat, name, text in (
                (C.Stat.EVENTS_SENT, "sent", "Flow events the kernel put in the ring buffer"),
                (C.Stat.EVENTS_RATE_LIMITED, "rate_limited",
                 "Flow events not sent: over events_per_second"),
                (C.Stat.EVENTS_LOST, "lost", "Flow events lost: the ring buffer was full")):
            yield CounterMetricFamily(f"ausd_flow_events_{name}", text,
                                      value=_percpu_sum(m.lookup(ctypes.c_uint32(stat))))

    def _users_and_maps(self):
        d = self.d
        ks = d.kstate     # replaced whole by the main loop, never edited
        yield _gauge("ausd_active_users", "Managed login UIDs whose rules are in the kernel "
                     "(logged in, or with processes left)",
                     sum(1 for u in ks.users.values() if u.managed))
        if d.loaded is None or not d.loaded.maps:
            return
        entries = GaugeMetricFamily("ausd_map_entries", "Entries in each map",
                                    labels=["map"])
        size = GaugeMetricFamily("ausd_map_max_entries", "Capacity of each map (ausd.yaml "
                                 "max_*)", labels=["map"])
        fill = GaugeMetricFamily("ausd_map_fill_ratio", "Entries / capacity of each map",
                                 labels=["map"])
        for name, count in FILLED_MAPS.items():
            n, cap = count(ks), getattr(d.loaded.maps[name], "max_entries", 0)
            entries.add_metric([name], n)
            size.add_metric([name], cap)
            fill.add_metric([name], n / cap if cap else 0.0)
        yield entries
        yield size
        yield fill

    def _policy(self):
        d = self.d
        version = d.compiled.version if d.compiled is not None else 0
        yield _gauge("ausd_policy_version", "Version of the policy in the kernel "
                     "(0: none yet)", version)
        applied = d.policy_applied_at
        if applied is not None:
            yield _gauge("ausd_policy_applied_timestamp_seconds",
                         "When this ausd put the policy version in the kernel (Unix time)",
                         applied)
            yield _gauge("ausd_policy_age_seconds", "Seconds since the policy version "
                         "in force was put in the kernel", max(0.0, time.time() - applied))
        yield _gauge("ausd_policy_refused", "1 when the last policy offered was refused "
                     "(the one before stays in force)", 1 if d.policy_error else 0)
        mode = GaugeMetricFamily("ausd_mode", "The mode in force (1) and the other (0)",
                                 labels=["mode"])
        for name in C.MODES:
            mode.add_metric([name], 1 if d.mode.mode == name else 0)
        yield mode

    def _bundle(self):
        if self.d.follower is None:
            return
        st = self.d.follower.status()
        yield CounterMetricFamily("ausd_bundle_fetch_errors", "Failed requests to the "
                                  "policy server for the bundle", value=st.get("errors", 0))
        yield _gauge("ausd_bundle_fetch_failing", "Failed requests in a row (0: the last "
                     "one worked)", st.get("failures", 0))
        if st.get("last_fetch") is not None:
            yield _gauge("ausd_bundle_last_fetch_timestamp_seconds", "When the policy "
                         "server last answered (Unix time)", st["last_fetch"])

    def _logins(self):
        buckets, total = self.d.login_latency.snapshot()
        yield HistogramMetricFamily(
            "ausd_login_latency_seconds", "From a session open request (the PAM hook) to "
            "the user's rules in the kernel", buckets=buckets, sum_value=total)


    def _dns(self):
        """DNS-name destinations: the forwarder's counters and the entries
        answers made (docs/dns.md)."""
        if self.d.dns is None:
            return
        st = self.d.dns.status()
        q = CounterMetricFamily("ausd_dns_forwarder", "The DNS forwarder's events by kind "
                                "(queries, answers, refused, upstream_errors, ...)", labels=["kind"])
        for kind, value in sorted(st["forwarder"].items()):
            q.add_metric([kind], value)
        yield q
        yield _gauge("ausd_dns_entries", "Addresses DNS answers allow, over all users",
                     st["entries"])
        yield CounterMetricFamily("ausd_dns_overflow", "Addresses not allowed because the "
                                  "user had dns_max_per_user already", value=st["overflow"])
        yield _gauge("ausd_dns_redirecting", "1 while managed users' DNS goes through the "
                     "forwarder", 1 if st["enabled"] else 0)


def _gauge(name: str, text: str, value: float, **labels: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, text, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


# ---- serving ---------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "ausd-metrics"
    timeout = 10          # a client that stalls longer is dropped

    def do_GET(self) -> None:   # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "ausd serves /metrics")
            return
        try:
            body = generate_latest(self.server.registry)
        except Exception:     # a bug costs the scrape, never the listener
            log.exception("metrics: scrape failed")
            self.send_error(500, "see ausd's log")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args) -> None:
        log.debug("metrics: %s %s", self.address_string(), fmt % args)


class _Server(http.server.HTTPServer):
    """One request at a time: a scrape is short, and a flood of clients
    must not become a flood of threads."""

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry = registry
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's would look up the address's FQDN (DNS) at start.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def write_textfile(path: Path, registry: CollectorRegistry) -> None:
    """Write the metrics next to ``path`` and rename them over it, so
    node-exporter never reads half a file; readable by all (ausd runs
    with UMask=0077, node-exporter as its own user)."""
    body = generate_latest(registry)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, body)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


class Exporter:
    """The listener and/or the textfile writer of one daemon."""

    def __init__(self, daemon):
        cfg = daemon.cfg
        self.listen = cfg.metrics_listen
        self.textfile = cfg.metrics_textfile
        self.interval = cfg.metrics_interval
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(daemon))
        self.server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.textfile is not None

    def start(self) -> None:
        """Start serving. A listener that cannot bind is logged and left
        off: enforcement never depends on metrics."""
        if self.listen is not None:
            host, port = self.listen
            try:
                self.server = _Server((host, port), self.registry)
            except OSError as exc:
                log.error("metrics: cannot listen on %s: %s; serving no metrics there",
                          _hostport(host, port), exc.strerror or exc)
            else:
                self._thread(self.server.serve_forever, "aus-metrics")
                log.info("metrics: serving http://%s/metrics", _hostport(host, port))
        if self.textfile is not None:
            self._thread(self._write_loop, "aus-metrics-file")
            log.info("metrics: writing %s every %g s", self.textfile, self.interval)

    def _thread(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _write_loop(self) -> None:
        while True:
            try:
                write_textfile(self.textfile, self.registry)
            except OSError as exc:
                if not self._failing:
                    log.error("metrics: cannot write %s: %s (logged again when it works)",
                              self.textfile, exc.strerror or exc)
                self._failing = True
            except Exception:
                log.exception("metrics: writing %s failed", self.textfile)
            else:
                if self._failing:
                    log.info("metrics: %s written again", self.textfile)
                self._failing = False
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        for t in self._threads:
            t.join(5)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
