"""ausd: keeps the kernel's maps filled with the rules of whoever is logged in.

Start: probe the kernel, lock the pins, read the policy, compile and load
the programs (reusing pinned maps), rebuild the model of what the maps
hold, write the first policy, swap the programs into the cgroup links, and
only then tell systemd READY. Then one loop: control requests, the results
of a /proc scan (read every ``scan_interval`` by a helper thread), new
policy bundles (long-polled from the policy server by another helper
thread, when ``policy`` is a URL), directory answers (from the lookup
pool's threads, :mod:`.lookups`), signals (HUP reloads, TERM/INT exit),
and flow events from the ring buffer. Helper threads never change the
daemon's state: they hand their results to the loop. Exiting leaves
programs and maps pinned and attached: enforcement does not depend on this
process.

The directory is never waited for when the maps already hold users (a
restart): each logged-in user keeps the rules the kernel holds for it
("adopted") until its lookup answers in full, which the pool does after
READY; a login (``session open``) is looked up on its own path, ahead of
that queue. A cold start looks its users up concurrently, from before the
compile, and waits at most COLD_START_WAIT after it (less when the
directory stops answering); who is not answered by then is denied (fail
closed) until the answer comes. See docs/restarts.md.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import os
import pwd
import select
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..core import compiler, explain
from ..core import contract as C
from ..core.bundle import Bundle
from ..core.errors import AusError, ConfigError, PolicyError
from ..core.flowrecord import FlowRecord
from ..core.policy import Policy, empty_policy, load_policy
from ..core.state import UNMANAGED, Desired, KernelState, plan
from ..logs import setup as logsetup
from . import (
    commands,
    control,
    flows,
    loader,
    loginreport,
    mapsync,
    pins,
    report,
    subjects,
)
from .config import DEFAULT_CONFIG_PATH, DaemonConfig, load_config
from .dnsmaps import DnsMaps
from .dnsnames import DnsNames
from .enforcement import mode_in_force
from .flowlog import sink_of as flow_log_sink
from .flowrecords import Aggregator as FlowAggregator
from .flowrecords import Filter as FlowFilter
from .flowrecords import policy_groups
from .flowupload import uploader_for
from .follower import BundleFollower, Delivery
from .identity import COMPLETE, UNAVAILABLE, Answer, Directory, UserInfo, files_only
from .lookups import NEW_USER, Bounded, LookupPool
from .lookups import WORKERS as LOOKUP_WORKERS
from .metrics import Exporter as MetricsExporter
from .metrics import LoginLatency
from .policysource import Fetched, Refused
from .report import Identity, Snapshot
from .ringbuf import RingBuffer
from .sdnotify import Notifier
from .sessions import Sessions, peer_loginuid, scan_loginuids, viewer_of

log = logging.getLogger(__name__)

DEFAULT_CONFIG = str(DEFAULT_CONFIG_PATH)
FLOW_HISTORY = 2000
REFRESHES_PER_SCAN = 500   # directory lookups at most queued per scan
ANSWERS_PER_PASS = 32      # directory answers applied per pass of the loop
LOGIN_LOOKUP_TIMEOUT = 1.5  # a login's own lookup; then it gets what is known
RETRY_AFTER = 5.0          # an adopted user not answered is asked again after this
COLD_START_WAIT = 1.0      # a cold start waits this long at most for lookups after the compile


def setup_logging(level: str) -> None:
    """Journal entries under systemd, plain stderr lines otherwise."""
    logsetup.setup(level, "ausd")


class Daemon:
    def __init__(self, cfg: DaemonConfig, notifier: Notifier | None = None):
        self.cfg = cfg
        self.notifier = notifier or Notifier(None)
        self.lock = pins.PinLock(cfg.pin_dir)
        self.loaded: loader.Loaded | None = None
        self.kstate = KernelState()
        self.policy: Policy | None = None
        self.policy_digest = ""
        self.policy_error: str | None = None
        self.compiled: compiler.CompiledPolicy | None = None
        self.want: dict[int, compiler.Ruleset | str] = {}
        self.directory = Directory(ttl=cfg.groups_ttl)
        # Directory answers come from the pool's threads through _answers;
        # a login's lookup runs on a pool of its own, never queued behind.
        self._answers: collections.deque = collections.deque()
        self.lookups = LookupPool(lambda uid: self.directory.ask(uid), self._answered,
                                  workers=1 if files_only() else LOOKUP_WORKERS)
        self.login_lookup = Bounded(lambda uid: self.directory.ask(uid))
        # Users whose rules are the ones the maps held at the start, not
        # recomputed yet (no complete directory answer since): uid -> when
        # to ask again if the last lookup did not answer.
        self.adopted: dict[int, float] = {}
        self.refresh: dict = {}
        self.sessions = Sessions()
        self.unmanaged = set(cfg.unmanaged_login_uids)
        self.started = time.time()
        self.policy_applied_at: float | None = None   # when the version in force went in
        self.login_latency = LoginLatency()
        metrics = MetricsExporter(self)
        self.metrics = metrics if metrics.enabled else None
        self.flow_history: collections.deque = collections.deque(maxlen=FLOW_HISTORY)
        # Flow records: events folded per window; at each close every sink
        # gets (records, dropped by the cap) and must return at once.
        self.flow_records = FlowAggregator(cfg.flow_window, cfg.flow_window_records,
                                           self._who, time.monotonic)
        self.flow_sinks: list[Callable[[list[FlowRecord], int], None]] = []
        self.flow_log = flow_log_sink(cfg.flow_log)
        if self.flow_log is not None:
            self.flow_sinks.append(self.flow_log)
        # The latest closed records, for ausctl flows --records.
        self.flow_recent: collections.deque[FlowRecord] = collections.deque(
            maxlen=cfg.flow_window_records)
        self._policy_groups: dict[tuple, tuple[str, ...]] = {}
        self._policy_groups_of: Policy | None = None
        self.ring: RingBuffer | None = None
        self.dns: DnsNames | None = None   # DNS-name destinations, once the maps are loaded
        self._scanned: dict[int, int] | None = None   # handed over by the scanner
        self._stopping = threading.Event()
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        self.listener: socket.socket | None = None
        self.server: control.Server | None = None
        self.last_sync: dict = {}
        self.start_stages: dict[str, float] = {}
        # Why each login UID in self.want gets its rules (for users/rules).
        self.identities: dict[int, Identity] = {}
        # With a policy URL: the follower of the policy server, the bundle
        # whose memberships count, and deliveries waiting for the main loop.
        self.follower = BundleFollower(cfg, self._deliver) if cfg.policy_url else None
        self.bundle: Bundle | None = None
        # The mode in the kernel and where it came from (see enforcement.py).
        self.mode = mode_in_force(cfg, None, None)
        self._inbox: collections.deque[Delivery] = collections.deque()
        self.uploader = uploader_for(cfg)
        if self.uploader is not None:
            self.flow_sinks.append(self.uploader.submit)
        # The handler of each command of commands.COMMANDS (which says what
        # a request may hold and who may send it). A handler gets the
        # validated fields, the peer, and the login UID the peer may see
        # (None: root, everyone).
        self.handlers = {
            "status": self.cmd_status, "users": self.cmd_users,
            "rules": self.cmd_rules, "flows": self.cmd_flows,
            "reload": self.cmd_reload, "session_open": self.cmd_session_open,
            "session_close": self.cmd_session_close, "explain": self.cmd_explain,
        }
        assert self.handlers.keys() == commands.COMMANDS.keys()

    @property
    def policy_source(self) -> str:
        return self.cfg.policy_url or str(self.cfg.policy)

    # ---- policy ----------------------------------------------------------
    def _read_policy(self) -> tuple[Policy, str]:
        path = self.cfg.policy
        policy = load_policy(path)
        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            digest = ""
        return policy, digest

    def _compile(self, policy: Policy, version: int,
                 source: str | None = None) -> compiler.CompiledPolicy:
        names = {name: rid for rid, name in self.kstate.rules.items()
                 if rid != C.RULE_BASELINE}
        try:
            compiled = compiler.compile_policy(policy, self.cfg.baseline_networks,
                                               rule_ids=names, max_rules=self.cfg.max_rules,
                                               version=version)
        except ValueError as exc:
            raise PolicyError(source or self.policy_source, [str(exc)]) from exc
        compiled.warm()   # large groups' rulesets now, not at their first login
        return compiled

    def _install(self, policy: Policy, digest: str, version: int, why: str,
                 source: str, bundle: Bundle | None = None) -> compiler.CompiledPolicy:
        """The one way a new policy takes effect after the start (reload,
        SIGHUP, a new bundle): compile it, recompute every logged-in user's
        rules (a bundle also changes memberships) and bring the maps there,
        atomically per user. A policy that does not compile changes nothing."""
        compiled = self._compile(policy, version, source)
        if self.compiled is None or compiled.version != self.compiled.version:
            self.policy_applied_at = time.time()
        self.policy, self.policy_digest, self.compiled = policy, digest, compiled
        self.bundle = bundle
        self.policy_error = None
        self._follow_mode()
        self.rebuild_want()
        self.sync(why)   # the new mode goes into the config map with the users
        if self.dns is not None:
            self.dns.policy_changed(compiled)
        return compiled

    def _follow_mode(self) -> None:
        """Take the mode the bundle in force sets, unless ausd.yaml sets one."""
        new = mode_in_force(self.cfg, self.bundle,
                            self.follower.workload if self.follower is not None else None)
        if new.mode != self.mode.mode:
            log.warning("mode %s -> %s (from %s)", self.mode.mode, new.mode, new.source)
        self.mode = new
        if self.follower is not None:
            self.follower.report_mode(new.mode)

    def reload(self) -> dict:
        """Re-read the policy; a bad one is refused and the old stays.
        With a policy URL: re-read the credentials and fetch now."""
        if self.cfg.policy_url:
            return self.refetch()
        try:
            policy, digest = self._read_policy()
            version = self.kstate.config.policy_version
            if digest != self.policy_digest:
                version += 1
            compiled = self._install(policy, digest, version, "reload", str(self.cfg.policy))
        except PolicyError as exc:
            self.policy_error = str(exc)
            log.error("%s (the policy in force stays)", exc)
            return {"ok": False, "error": str(exc)}
        log.info("policy %s loaded: version %d, %d rules", self.cfg.policy,
                 compiled.version, len(compiled.rules))
        self.log_logins()
        return {"ok": True, "version": compiled.version, "rules": len(compiled.rules)}

    # ---- policy bundles (policy: a URL) --------------------------------------
    def refetch(self) -> dict:
        """Fetch the bundle now instead of at the end of the long poll; the
        credentials file is read again first (key rotation)."""
        assert self.follower is not None
        try:
            self.follower.refetch()
        except ConfigError as exc:
            log.error("%s (the credentials in use stay)", exc)
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "refetch": True, "url": self.cfg.policy_url,
                "version": self.compiled.version, "rules": len(self.compiled.rules)}

    def _deliver(self, item: Delivery) -> None:
        """Called by the poller thread: queue for the main loop."""
        self._inbox.append(item)
        try:
            os.write(self._wake_w, b"b")
        except OSError:
            pass

    def _refused(self, item: Refused) -> None:
        self.policy_error = str(item.error)
        log.error("%s (the policy in force stays)", item.error)

    def apply_fetched(self, item: Delivery) -> None:
        """A delivery from the poller, in the main loop; the server is told
        the version in force afterwards, whatever happened."""
        try:
            if isinstance(item, Refused):
                self._refused(item)
                return
            b = item.bundle
            try:
                self._install(b.policy, b.digest, b.version, "bundle",
                              f"bundle version {b.version} from {self.cfg.policy_url}",
                              bundle=b)
            except AusError as exc:
                self.policy_error = str(exc)
                log.error("%s (the policy in force stays)", exc)
                return
            self._bundle_in_force(item)
            self.log_logins()
        finally:
            self.follower.acknowledge()

    def _bundle_in_force(self, item: Fetched) -> None:
        self.follower.in_force(item)
        b = item.bundle
        log.info("policy bundle version %d of org %s in force (from %s): %d rules, "
                 "%d groups", b.version, b.org, self.cfg.policy_url,
                 len(self.compiled.rules), len(b.policy.user_groups))

    def groups_of(self, uid: int) -> tuple[UserInfo, tuple[str, ...]]:
        """What a lookup now gives for a user, and its bundle groups (for
        tools and tests; the loop takes answers from the lookup pool)."""
        info = self.directory.get(uid)
        return info, self.bundle_groups(info)

    def bundle_groups(self, info: UserInfo) -> tuple[str, ...]:
        """The bundle groups a user is a member of."""
        return self.bundle.groups_of(info.name, self.cfg.bundle_user_match) \
            if self.bundle is not None else ()

    def rules_of(self, info: UserInfo, bundle_groups: tuple[str, ...]) -> frozenset[int]:
        groups = info.groups + tuple(g for g in bundle_groups if g not in info.groups)
        return self.compiled.matching_rules(groups, info.sids)

    # ---- desired state and sync -------------------------------------------
    # self.want holds each login UID's desired ruleset; it is updated for
    # the users that change (a login, a scan, a group refresh) and rebuilt
    # whole only when the policy changes, so a login costs O(1) users.
    def _content(self, uid: int, info: UserInfo):
        """A user's ruleset from its directory answer (every answer is
        turned into the ruleset at once)."""
        extra = self.bundle_groups(info)
        rule_ids = self.rules_of(info, extra)
        self.identities[uid] = Identity(info, extra, rule_ids)
        self.adopted.pop(uid, None)
        return self.compiled.ruleset(rule_ids)

    def rebuild_want(self) -> None:
        """Every active user's ruleset under the policy in force, from the
        groups known (never a lookup: the loop must not wait on NSS). A
        user with no answer yet keeps what the maps hold (adopted) or
        stays out (pending, denied) until its lookup answers."""
        old, self.want = self.want, {uid: UNMANAGED for uid in self.unmanaged}
        self.identities = {}
        for uid in self.sessions.active(self.unmanaged):
            info = self.directory.cached(uid)
            if info is not None:
                self.want[uid] = self._content(uid, info)
            elif uid in self.adopted and uid in old:
                self.want[uid] = old[uid]
            elif not self.lookups.busy(uid):
                self.lookups.submit(uid, NEW_USER)

    def adopt(self) -> None:
        """At the start: every active user the maps hold keeps its ruleset
        as it is, and is queued for a refresh; the others are queued
        first. Nothing waits for the directory."""
        self.want = {uid: UNMANAGED for uid in self.unmanaged}
        active = self.sessions.active(self.unmanaged)
        now = time.monotonic()
        contents = self.kstate.ruleset_contents()   # each ruleset's content, built once
        for uid in sorted(active):
            entry = self.kstate.users.get(uid)
            if entry is not None and entry.managed:
                content = contents.get(entry.ruleset)
                self.want[uid] = content if content is not None else \
                    self.kstate.ruleset_content(entry.ruleset)
                self.adopted[uid] = now
        for uid in sorted(active - self.adopted.keys()):
            self.lookups.submit(uid, NEW_USER)
        for uid in self.adopted:
            self.lookups.submit(uid)
        self.refresh = {"adopted": len(self.adopted), "started": time.time(), "done": None}

    def look_up_now(self, deadline_idle: float, most: float | None = None) -> None:
        """Cold start: wait for the queued lookups, applying answers as
        they come, until none is left, or none has answered for
        ``deadline_idle`` seconds (a directory that hangs), or ``most``
        seconds have passed (a slow one)."""
        first = last = time.monotonic()
        while self.lookups.pending():
            if self._answers:
                self.take_answers(limit=None, sync=False)
                last = time.monotonic()
            elif time.monotonic() - last >= deadline_idle or \
                    (most is not None and time.monotonic() - first >= most):
                log.warning("directory: %d users not answered yet; they get the baseline "
                            "only until their lookup answers (after READY)",
                            self.lookups.pending())
                break
            if select.select([self._wake_r], [], [], 0.05)[0]:
                os.read(self._wake_r, 4096)
        self.take_answers(limit=None, sync=False)

    # ---- directory answers (from the lookup pool) ---------------------------
    def _answered(self, uid: int, answer: Answer) -> None:
        """Called by a pool thread: queue for the loop."""
        self._answers.append((uid, answer))
        try:
            os.write(self._wake_w, b"l")
        except OSError:
            pass

    def take_answers(self, limit: int | None = ANSWERS_PER_PASS, sync: bool = True) -> int:
        """Apply directory answers (at most ``limit``, so that control
        requests are served between batches); lookups past their timeout
        count as not answered. Returns how many answers are left."""
        changed = set()
        now = time.monotonic()
        for uid in self.lookups.overdue():
            self._not_answered(uid, f"lookup took longer than {self.lookups.timeout:g} s",
                               now, changed)
        done = 0
        while self._answers and (limit is None or done < limit):
            uid, answer = self._answers.popleft()
            done += 1
            if not self.sessions.is_active(uid, self.unmanaged):
                continue
            if answer.status != COMPLETE and uid in self.adopted:
                self._not_answered(uid, answer.detail or answer.status, now, changed)
                continue
            content = self._content(uid, self.directory.take(uid, answer))
            if content != self.want.get(uid):
                self.want[uid] = content
                changed.add(uid)
        if self.refresh.get("adopted") and not self.adopted and self.refresh["done"] is None:
            self.refresh["done"] = time.time()
            log.info("directory: all %d adopted users refreshed in %.1f s",
                     self.refresh["adopted"], self.refresh["done"] - self.refresh["started"])
        if changed and sync:
            self.sync("directory", changed)
        if self._answers:
            try:
                os.write(self._wake_w, b"l")   # the rest after the next requests
            except OSError:
                pass
        return len(self._answers)

    def _not_answered(self, uid: int, why: str, now: float, changed: set[int]) -> None:
        """An adopted user keeps what the maps hold and is asked again
        later; anyone else is judged on what is known (the last groups,
        else none: the baseline), as a lookup that failed."""
        if uid in self.adopted:
            self.adopted[uid] = now + RETRY_AFTER
            return
        if not self.sessions.is_active(uid, self.unmanaged):
            return
        info = self.directory.take(uid, Answer(None, status=UNAVAILABLE, detail=why))
        content = self._content(uid, info)
        if content != self.want.get(uid):
            self.want[uid] = content
            changed.add(uid)

    def directory_status(self) -> dict:
        """Refresh progress for ``ausctl status``."""
        return {**self.lookups.status(), "adopted_not_refreshed": len(self.adopted),
                "adopted_at_start": self.refresh.get("adopted", 0),
                "refresh_started": self.refresh.get("started"),
                "refresh_done": self.refresh.get("done")}

    def desired(self) -> Desired:
        assert self.compiled is not None
        return Desired(users=self.want, baseline=self.compiled.baseline_ruleset(),
                       rules=self.compiled.rule_names,
                       mode=C.MODES[self.mode.mode],
                       events_per_sec=self.cfg.events_per_second,
                       events_burst=self.cfg.events_burst,
                       policy_version=self.compiled.version,
                       dns_portsets=self.compiled.dns_portsets() | (
                           self.dns.portsets() if self.dns is not None else frozenset()))

    def sync(self, why: str, changed: set[int] | None = None) -> None:
        """Bring the maps to self.want; ``changed`` names the only users
        that may differ (None: compare everyone)."""
        assert self.loaded is not None
        t0 = time.perf_counter()
        p, new = plan(self.kstate, self.desired(), changed)
        if p:
            try:
                mapsync.apply(p, self.loaded.maps)
            except AusError:
                # Half applied (a map full, say): every user still points
                # at complete content; model what the maps really hold so
                # the next plan starts from there.
                self.kstate = mapsync.read_state(self.loaded.maps)
                if self.dns is not None:
                    self.dns.published(self.kstate)
                raise
            self.kstate = new
            log.debug("sync (%s): %s", why, p.summary())
        if self.dns is not None:
            self.dns.published(self.kstate)
            self._dns_users(changed)
        self.last_sync = {"why": why, "changes": p.summary() if p else {},
                          "seconds": round(time.perf_counter() - t0, 6),
                          "at": time.time()}

    def _dns_users(self, changed: set[int] | None) -> None:
        """The DNS grants of the users that changed (everyone: None) for
        the forwarder; a user gone loses what answers allowed it."""
        assert self.dns is not None
        grants = {} if changed is None else dict(self.dns.grants_by_user)
        for uid in (self.identities if changed is None else changed):
            ident = self.identities.get(uid)
            g = self.compiled.dns_grants(ident.rule_ids) if ident is not None else None
            if g:
                grants[uid] = g
            else:
                grants.pop(uid, None)
        self.dns.set_grants(grants)
        gone = (set(self.dns.table_users()) if changed is None else changed) - self.want.keys()
        for uid in gone:
            self.dns.user_gone(uid)

    def apply_scan(self, counts: dict[int, int]) -> None:
        """Users that came or went, and stale group lists, since the last
        scan. Refreshes are capped per scan so that many users do not
        flood the directory all at once."""
        self.sessions.update_scan(counts)
        active = self.sessions.active(self.unmanaged)
        changed = set()
        for uid in active - self.want.keys():
            self.lookups.submit(uid, NEW_USER)   # its rules come with the answer
        for uid in [u for u in self.want if u not in active and u not in self.unmanaged]:
            del self.want[uid]
            self.identities.pop(uid, None)
            self.directory.forget(uid)
            self.adopted.pop(uid, None)
            changed.add(uid)
        now = time.monotonic()
        for uid, at in self.adopted.items():
            if at <= now and not self.lookups.busy(uid):
                self.lookups.submit(uid)
        for uid in self.directory.due(REFRESHES_PER_SCAN):
            if uid in active:
                self.lookups.submit(uid)
        if changed:
            self.sync("scan", changed)

    def log_logins(self) -> None:
        """Log what every login UID with processes gets (loginreport.py)."""
        names = {}
        for uid in self.unmanaged:
            if self.sessions.processes.get(uid):
                try:
                    names[uid] = pwd.getpwuid(uid).pw_name
                except KeyError:
                    names[uid] = None
        for line in loginreport.lines(
                self.sessions.processes, self.unmanaged, self.identities, names,
                [(g.name, g.sid) for g in self.policy.user_groups],
                self.compiled.rule_names, self.mode.mode):
            log.info("%s", line)

    # ---- start / stop ----------------------------------------------------
    def start(self) -> None:
        stages = self.start_stages = {}
        t = time.perf_counter()

        def stage(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            stages[name] = round(now - t, 3)
            t = now

        offset = loader.probe(self.cfg)
        self.lock.acquire()
        bundle = first = None
        if self.follower is not None:
            bundle, first, refusals = self.follower.start()
            for item in refusals:
                self._refused(item)
            policy = bundle.policy if bundle else empty_policy()
            digest = bundle.digest if bundle else ""
        else:
            policy, digest = self._read_policy()   # a bad policy stops the start
        stage("probe and policy")
        if not pins.PinLayout(self.cfg.pin_dir).map(C.MAP_USERS).exists():
            # Nothing pinned (a cold start): the users are looked up while
            # the programs compile, in the build process.
            self.sessions.update_scan(scan_loginuids())
            self.lookups.start()
            for uid in sorted(self.sessions.active(self.unmanaged)):
                self.lookups.submit(uid, NEW_USER)
        self.loaded = loader.compile_and_load(self.cfg, offset)
        stage("take the attached programs" if self.loaded.reused else "compile and load")
        self.kstate = mapsync.read_state(self.loaded.maps)
        self.dns = DnsNames(DnsMaps(self.loaded.maps), port=self.cfg.dns_port,
                            max_per_user=self.cfg.dns_max_per_user, grace_s=self.cfg.dns_grace,
                            timeout=self.cfg.dns_timeout, wake=self._wake_dns)
        self.dns.adopt(self.kstate)   # before the first sync: it keeps their portsets
        if self.cfg.policy_url:
            # The kernel's version is the bundle's (0: none yet).
            version = bundle.version if bundle else 0
        else:
            version = self.kstate.config.policy_version + 1
        try:
            self.compiled = self._compile(policy, version)
        except PolicyError as exc:
            if bundle is None:
                raise
            # A bundle this ausd cannot compile (more rules than max_rules):
            # fail closed and keep polling for a better one.
            self.policy_error = str(exc)
            log.error("%s; enforcing the baseline only", exc)
            bundle = first = None
            policy, digest = empty_policy(), ""
            self.compiled = self._compile(policy, 0)
        self.policy, self.policy_digest, self.bundle = policy, digest, bundle
        self._follow_mode()
        self.sessions.update_scan(scan_loginuids())
        self.lookups.start()
        self.adopt()
        stage("adopt maps and scan /proc")
        if not self.adopted:
            # Nothing to keep enforcing (a cold start): wait, but only as
            # long as the directory keeps answering, and at most
            # COLD_START_WAIT; the rest follow READY.
            self.look_up_now(self.lookups.timeout, COLD_START_WAIT)
            stage("directory lookups")
        self.sync("start")
        self.policy_applied_at = time.time()
        stage("write maps")
        try:
            self.dns.serve()
        except AusError as exc:
            # Names then allow nothing (fail closed); everything else works.
            log.error("%s: DNS is not redirected and DNS-name rules allow nothing", exc)
        self.dns.policy_changed(self.compiled)
        stage("DNS forwarder")
        loader.attach(self.loaded, self.cfg.cgroup_path)
        stage("attach")
        if self.follower is not None:
            self.follower.enforcing(bundle)
            if first is not None:
                self._bundle_in_force(first)
        self._start_events()
        self.listener = control.listen(self.cfg.socket)
        self.server = control.Server(self.listener, self.handle)
        if self.metrics is not None:   # before READY: a scrape after it finds the listener
            self.metrics.start()
        self.notifier.ready(f"enforcing policy version {self.compiled.version}"
                            if self.compiled.version or not self.cfg.policy_url else
                            "no policy bundle yet: enforcing the baseline only")
        log.info("ausd %s ready: mode %s (from %s), cgroup %s, %d active users, pins %s",
                 __version__, self.mode.mode, self.mode.source, self.cfg.cgroup_path,
                 len(self.sessions.active(self.unmanaged)), self.cfg.pin_dir)
        self.log_logins()
        if self.uploader is not None:
            self.uploader.start()

    def _start_events(self) -> None:
        self.ring = RingBuffer(str(self.loaded.layout.map(C.MAP_EVENTS)))

    def close(self) -> None:
        if self.metrics is not None:   # first: a scrape reads the maps closed below
            self.metrics.stop()
        if self.dns is not None:
            self.dns.stop()
        self.lookups.stop()
        if self.uploader is not None:
            self.uploader.stop()
        if self.follower is not None:
            self.follower.stop()
        if self.server:
            self.server.close()
        if self.listener:
            self.listener.close()
            try:
                os.unlink(self.cfg.socket)
            except OSError:
                pass
        if self.ring:
            self.ring.close()
        if self.flow_log is not None:
            self.flow_log.close()
        if self.loaded:
            self.loaded.close()
        self.lock.release()

    # ---- main loop -------------------------------------------------------
    def _wake_dns(self) -> None:
        """Called by the DNS forwarder's thread: an answer waits for a
        portset only the main loop can write."""
        try:
            os.write(self._wake_w, b"d")
        except OSError:
            pass

    def _on_signal(self, signum, _frame) -> None:
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b"s")
        except OSError:
            pass

    def run(self) -> int:
        for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ, "control")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        sel.register(self.ring, selectors.EVENT_READ, "events")
        scanner = threading.Thread(target=self._scanner, name="aus-scan", daemon=True)
        scanner.start()
        if self.follower is not None:
            self.follower.run()
        while True:
            deadline = self.server.timeout()
            wait = self.flow_records.timeout()
            for key, _ in sel.select(wait if deadline is None else min(deadline, wait)):
                if key.data == "control":
                    pass   # served below, with the deadlines
                elif key.data == "events":
                    self.ring.drain(self._on_event)
                else:
                    os.read(self._wake_r, 4096)
            self.server.service()
            closed = self.flow_records.step()
            if closed is not None:
                self.hand_over_flows(*closed)
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading the policy")
                    try:
                        self.reload()
                    except AusError as exc:
                        log.error("reload: %s", exc)
                else:
                    log.info("%s: exiting; enforcement stays in the kernel",
                             signal.Signals(signum).name)
                    self.notifier.stopping()
                    self._stopping.set()
                    self.hand_over_flows(*self.flow_records.close())
                    return 0
            while self._inbox:
                self.apply_fetched(self._inbox.popleft())
            if self.dns.wanted():
                try:
                    self.sync("dns")
                except AusError as exc:
                    log.error("DNS entries' services: %s", exc)
                self.dns.portsets_synced()
            if self._answers or self.lookups.pending():
                try:
                    self.take_answers()
                except AusError as exc:
                    log.error("directory answers: %s", exc)
            counts, self._scanned = self._scanned, None
            if counts is not None:
                try:
                    self.apply_scan(counts)
                    self.dns.expire()
                except AusError as exc:
                    log.error("scan: %s", exc)
                self.notifier.watchdog()

    def _scanner(self) -> None:
        """Reads /proc in its own thread: with many processes a scan takes
        tens of milliseconds, which logins must not wait for. The main loop
        takes each result and acts on it."""
        while not self._stopping.wait(self.cfg.scan_interval):
            try:
                counts = scan_loginuids()
            except OSError as exc:
                log.error("scan of /proc: %s", exc)
                continue
            self._scanned = counts
            try:
                os.write(self._wake_w, b"p")
            except OSError:
                pass

    def _on_event(self, raw: bytes) -> None:
        ev = flows.decode(raw, self.kstate.rules)
        ident = self.identities.get(ev["login_uid"])
        ev["user"] = ident.info.name if ident is not None else None
        if ev["reason"] == "dns" and self.dns is not None:
            ev["dns_name"] = self.dns.name_for(ev["login_uid"], ev["family"], ev["dst"])
        self.flow_history.append(ev)
        self.flow_records.add(ev)
        self.server.broadcast({"ok": True, "flow": ev}, ev["login_uid"])

    # ---- flow records --------------------------------------------------------
    def _who(self, uid: int) -> tuple[str, tuple[str, ...]]:
        """A login UID's name and policy groups, from what the rules were
        computed with (never a directory lookup on the event path)."""
        ident = self.identities.get(uid)
        if ident is None or self.policy is None:
            return "", ()
        if self._policy_groups_of is not self.policy or len(self._policy_groups) > 4096:
            self._policy_groups, self._policy_groups_of = {}, self.policy
        info, extra = ident.info, ident.bundle_groups
        key = (info.groups + extra, info.sids)
        groups = self._policy_groups.get(key)
        if groups is None:
            declared = [(g.name, g.sid) for g in self.policy.user_groups]
            groups = self._policy_groups[key] = policy_groups(declared, *key)
        return info.name or "", groups

    def hand_over_flows(self, records: list[FlowRecord], dropped: int) -> None:
        """A closed window to every flow sink."""
        self.flow_recent.extend(records)
        if not records and not dropped:
            return
        for sink in self.flow_sinks:
            try:
                sink(records, dropped)
            except Exception:   # a sink's bug must not cost the loop
                log.exception("flow sink %r failed", sink)

    def flow_status(self) -> dict:
        st = self.flow_records.status()
        st["export"] = self.flow_log.status() if self.flow_log is not None else None
        return st

    # ---- control requests --------------------------------------------------
    def handle(self, line: bytes, peer: control.Peer) -> dict:
        """The reply to one request line; never raises (a bad request or a
        failing handler costs one error reply, never the daemon)."""
        try:
            req = commands.parse(line)
        except commands.RequestError as exc:
            log.debug("control request of uid %d refused: %s", peer.uid, exc)
            return commands.error(str(exc))
        if req.spec.root_only and peer.uid != 0:
            return commands.error(f"{req.cmd}: only root may {req.spec.root_because}")
        handler = self.handlers[req.cmd]
        return commands.run(lambda: handler(req.args, peer, viewer_of(peer)), req.cmd)

    def snapshot(self) -> Snapshot:
        """What the read commands report, as plain data."""
        return Snapshot(
            cfg=self.cfg, started=self.started, policy_source=self.policy_source,
            policy=self.policy, compiled=self.compiled, policy_error=self.policy_error,
            kstate=self.kstate, unmanaged=frozenset(self.unmanaged),
            identities=dict(self.identities), processes=dict(self.sessions.processes),
            bundle=self.bundle, mode=self.mode,
            server=self.follower.status() if self.follower is not None else None,
            last_sync=self.last_sync, start_stages=self.start_stages,
            upload=self.uploader.status() if self.uploader is not None else None,
            adopted=frozenset(self.adopted),
            layout=self.loaded.layout, maps=self.loaded.maps)

    # Read commands report from a snapshot and never ask the directory:
    # a read must not change what is enforced (a refresh that is not
    # followed by a recompute would hide a group removal from due()).
    def cmd_status(self, args, peer, viewer) -> dict:
        return {"ok": True, **report.status(self.snapshot()), "flow_records": self.flow_status(),
                "directory": self.directory_status(),
                "dns": self.dns.status() if self.dns is not None else None}

    def cmd_users(self, args, peer, viewer) -> dict:
        return {"ok": True, "users": report.users(self.snapshot(), viewer)}

    def cmd_rules(self, args, peer, viewer) -> dict:
        login_uid = args["login_uid"]
        if viewer is not None:
            if login_uid not in (None, viewer):
                return commands.error(f"rules: login UID {login_uid} is not yours; only "
                                      f"root sees other users' rules (yours: {viewer})")
            login_uid = viewer
        return {"ok": True, "rules": report.rules(self.snapshot(), login_uid)}

    def cmd_reload(self, args, peer, viewer) -> dict:
        return self.reload()

    def cmd_explain(self, args, peer, viewer) -> dict:
        if (args["user"] is None) == (args["groups"] is None) or None in (args["to"], args["proto"]):
            raise commands.RequestError("explain: give user or groups, and to and proto")
        subject = subjects.of_groups(args["groups"]) if args["user"] is None else \
            subjects.of_user(args["user"], bundle=self.bundle, match=self.cfg.bundle_user_match,
                             identities=self.identities)
        res = explain.explain(self.compiled, subject, args["to"], args["proto"], args["port"],
                              mode=self.mode.mode, unmanaged=self.unmanaged)
        return {"ok": True, **res, "policy": {"source": self.policy_source,
                                              "version": self.compiled.version}}

    def cmd_flows(self, args, peer, viewer) -> dict:
        limit, want = args["limit"], FlowFilter.of(args)
        if args["records"]:
            pick = [r for r in [*self.flow_recent, *self.flow_records.current()]
                    if (viewer is None or r.login_uid == viewer) and want.record(r)]
            return {"ok": True,
                    "records": [r.wire() for r in pick[len(pick) - limit:]] if limit else []}
        seen = [f for f in self.flow_history
                if (viewer is None or f["login_uid"] == viewer) and want.event(f)]
        reply = {"ok": True, "flows": seen[len(seen) - limit:] if limit else []}
        if args["follow"]:
            reply[control.FOLLOW] = control.FOLLOW_ALL if viewer is None else viewer
            reply[control.FOLLOW_MATCH] = lambda msg: want.event(msg["flow"])
        return reply

    def _peer_uid(self, peer) -> int:
        uid = peer_loginuid(peer.pid)
        if uid is None or uid == C.LOGINUID_UNSET:
            raise AusError("session: the calling process has no login UID "
                           "(run it from a login session, after pam_loginuid)")
        return uid

    def cmd_session_open(self, args, peer, viewer) -> dict:
        with self.lookups.paused():   # ahead of every background lookup
            return self._session_open(peer)

    def _session_open(self, peer) -> dict:
        t0 = time.perf_counter()
        uid = self._peer_uid(peer)
        if uid in self.unmanaged:
            return {"ok": True, "login_uid": uid, "managed": False}
        self.sessions.open(uid)
        answer = self._login_lookup(uid)
        if answer.status != COMPLETE and uid in self.adopted and uid in self.want:
            # the rules the maps hold stay until the directory answers
            self.lookups.submit(uid, NEW_USER)
            entry = self.kstate.users.get(uid)
            log.warning("session opened: login UID %d keeps the rules it had (%s)", uid,
                        answer.detail or answer.status)
            self.login_latency.observe(time.perf_counter() - t0)
            return {"ok": True, "login_uid": uid, "managed": True, "user": answer.name,
                    "adopted": True, "ruleset": entry.ruleset if entry else None}
        self.want[uid] = self._content(uid, self.directory.take(uid, answer))
        self.sync("session open", {uid})
        self.login_latency.observe(time.perf_counter() - t0)
        entry = self.kstate.users.get(uid)
        info, extra, rule_ids = self.identities[uid]
        rules = sorted(self.compiled.rule_names[r] for r in rule_ids)
        log.info("session opened: login UID %d (%s), groups %s, bundle groups %s, rules %s",
                 uid, info.name, list(info.groups), list(extra), _some(rules),
                 extra=logsetup.fields(login_uid=uid, user=info.name))
        return {"ok": True, "login_uid": uid, "managed": True, "user": info.name,
                "groups": list(dict.fromkeys(info.groups + extra)),
                "bundle_groups": list(extra), "rules": rules,
                "ruleset": entry.ruleset if entry else None}

    def _login_lookup(self, uid: int) -> Answer:
        """A login's directory answer, on its own threads (never queued
        behind refreshes) and bounded: past LOGIN_LOOKUP_TIMEOUT the user
        gets what is known (the last groups, else none) and is looked up
        again in the background."""
        answer = self.login_lookup(uid, LOGIN_LOOKUP_TIMEOUT)
        if answer is None:
            self.lookups.submit(uid, NEW_USER)
            return Answer(None, status=UNAVAILABLE,
                          detail=f"login lookup took longer than {LOGIN_LOOKUP_TIMEOUT:g} s")
        return answer

    def cmd_session_close(self, args, peer, viewer) -> dict:
        uid = self._peer_uid(peer)
        self.sessions.close(uid)
        # The entry goes at the next scan if no process carries the login
        # UID any more (scanning all of /proc here would slow logouts).
        return {"ok": True, "login_uid": uid,
                "processes": self.sessions.processes.get(uid, 0)}


def _some(names: list[str], most: int = 20) -> str:
    """A log line's list of names: 10,000 rule names would be 200 kB a login."""
    if len(names) <= most:
        return str(names)
    return f"{names[:most]} and {len(names) - most} more"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ausd", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG,
                    help=f"daemon configuration (default {DEFAULT_CONFIG})")
    ap.add_argument("--version", action="version", version=f"ausd {__version__}")
    ap.add_argument("--start-condition", action="store_true",
                    help="exit 1 if the configured policy file does not exist, else 0, "
                         "and start nothing (the unit's ExecCondition=)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.config, required=args.config != DEFAULT_CONFIG)
    except AusError as exc:
        logsetup.early_error("ausd", str(exc))
        # A bad configuration is not a reason to skip the start: the start
        # itself fails and says why.
        return 0 if args.start_condition else 2
    if args.start_condition:
        if cfg.policy_missing is not None:
            print(f"ausd: not starting: no policy at {cfg.policy_missing} (an example: "
                  "/usr/share/doc/aus/policy.example.yaml); put one there, then run: "
                  "systemctl start ausd", file=sys.stderr)
            return 1
        return 0
    setup_logging(cfg.log_level)
    daemon = Daemon(cfg, Notifier.from_env())
    try:
        daemon.start()
    except AusError as exc:
        log.error("%s", exc)
        daemon.close()
        return 1
    try:
        return daemon.run()
    finally:
        daemon.close()


if __name__ == "__main__":
    sys.exit(main())
