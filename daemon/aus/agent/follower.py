"""Following the policy server: which bundle is in force, where it came
from, the cache of the last good one, and the long poll for the next.

Only used when ``policy`` in ausd.yaml is a URL. The daemon asks the
follower for the bundle to start with (the cache, else one quick fetch),
applies every delivery in its main loop, and tells the follower which
bundle it then enforces; the follower keeps the cache and the server's
view (X-Aus-Enforcing) in step with that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..core.bundle import Bundle
from ..core.errors import PolicyError, PolicySourceError
from .bundlecache import read_cache, write_cache
from .config import DaemonConfig
from .policysource import Fetched, Poller, Refused, load_client, read_credentials

log = logging.getLogger(__name__)

Delivery = Fetched | Refused


class BundleFollower:
    def __init__(self, cfg: DaemonConfig, deliver: Callable[[Delivery], None]):
        self.cfg = cfg
        self.url = cfg.policy_url
        self._deliver = deliver
        self._early: list[Delivery] | None = None   # deliveries during start()
        self.poller: Poller | None = None
        self.bundle: Bundle | None = None            # the bundle in force
        self.etag: str | None = None
        self.fetched_at: float | None = None
        self.from_cache = False
        self.cache_error: str | None = None
        self.last_update: dict[str, Any] | None = None   # how the bundle in force came

    def _on_delivery(self, item: Delivery) -> None:
        """From the poller's thread: held during the start, else queued
        for the main loop."""
        if self._early is not None:
            self._early.append(item)
        else:
            self._deliver(item)

    def start(self) -> tuple[Bundle | None, Fetched | None, list[Refused]]:
        """The bundle to enforce at start: the cached one when it is valid
        (without waiting for the server); else the result of one quick
        fetch; else none (the daemon enforces the baseline only: fail
        closed). Returns it, the fetch that brought it (to be confirmed
        with :meth:`in_force` once applied), and any refusals."""
        client = load_client(self.url, self.cfg.policy_credentials, self.cfg.policy_ca)
        try:
            cached = read_cache(self.cfg.policy_cache, self.url)
        except PolicyError as exc:
            log.warning("%s", exc)
            self.cache_error = str(exc)
            cached = None
        if cached is not None:
            self.poller = Poller(client, self._on_delivery, wait=self.cfg.bundle_wait,
                                 etag=cached.etag, enforcing=cached.bundle.version,
                                 held=cached.bundle)
            self.etag, self.fetched_at, self.from_cache = cached.etag, cached.fetched_at, True
            log.info("enforcing the cached bundle %s (version %d) until the policy "
                     "server answers", self.cfg.policy_cache, cached.bundle.version)
            return cached.bundle, None, []
        self.poller = Poller(client, self._on_delivery, wait=self.cfg.bundle_wait)
        self._early = []
        try:
            self.poller.poll_once(first=True)
        finally:
            early, self._early = self._early, None
        first = next((i for i in reversed(early) if isinstance(i, Fetched)), None)
        refused = [i for i in early if isinstance(i, Refused)]
        if first is None:
            log.warning("no bundle from %s and no cache at %s: enforcing the baseline "
                        "only until the policy server answers", self.url, self.cfg.policy_cache)
            return None, None, refused
        return first.bundle, first, refused

    def run(self) -> None:
        """Start the long poll in its thread; ``enforcing`` is what the
        daemon enforces once started."""
        assert self.poller is not None
        self.poller.enforcing = self.bundle.version if self.bundle else 0
        self.poller.start()

    def enforcing(self, bundle: Bundle | None) -> None:
        """The daemon enforces ``bundle`` (None: the baseline only)."""
        self.bundle = bundle
        if self.poller is not None:
            self.poller.held = bundle

    def in_force(self, item: Fetched) -> None:
        """A fetched bundle was applied: record it, and cache it (only a
        bundle that was applied is the 'last good' one)."""
        b = self.bundle = item.bundle
        if self.poller is not None:
            self.poller.held = b
        self.etag, self.fetched_at, self.from_cache = item.etag, item.fetched_at, False
        self.last_update = {"kind": "delta" if item.delta_from is not None else "full",
                            "from_version": item.delta_from, "version": b.version,
                            "wire_bytes": item.wire_bytes, "at": item.fetched_at}
        self.cache_error = None
        try:
            write_cache(self.cfg.policy_cache, self.url, item.etag, b, item.fetched_at)
        except PolicySourceError as exc:
            self.cache_error = str(exc)
            log.error("%s", exc)

    @property
    def workload(self) -> str | None:
        """The name this workload goes by on the server (X-Aus-Workload)."""
        return self.poller.client.workload if self.poller is not None else None

    def report_mode(self, mode: str) -> None:
        """The mode now in force, told to the server with the next request."""
        if self.poller is not None:
            self.poller.client.mode = mode

    def acknowledge(self) -> None:
        """The main loop is done with a delivery; the next request tells
        the server the version now in force."""
        if self.poller is not None:
            self.poller.acknowledge(self.bundle.version if self.bundle else 0)

    def refetch(self) -> None:
        """Fetch now instead of at the end of the long poll, with the
        credentials file read again (key rotation). Raises ConfigError
        when that file is bad; the credentials in use stay."""
        assert self.poller is not None
        self.poller.client.set_credentials(read_credentials(self.cfg.policy_credentials))
        self.poller.kick()

    def stop(self) -> None:
        if self.poller is not None:
            self.poller.stop()

    def status(self) -> dict[str, Any]:
        """Where the policy in force came from: the bundle, the cache, the
        poller's last fetch and error (``ausctl status``)."""
        b = self.bundle
        poll = self.poller.status() if self.poller is not None else {}
        return {"url": self.url,
                "workload": self.workload,
                "bundle_version": b.version if b else None,
                "org": b.org if b else None,
                "generated_at": b.generated_at if b else None,
                "etag": self.etag if b else None,
                "fetched_at": self.fetched_at if b else None,
                "from_cache": self.from_cache if b else False,
                "cache": str(self.cfg.policy_cache),
                "cache_error": self.cache_error,
                "last_fetch": poll.get("last_fetch"),
                "last_error": poll.get("last_error"),
                "last_error_at": poll.get("last_error_at"),
                "failures": poll.get("failures", 0),
                "errors": poll.get("errors", 0),
                "next_retry": poll.get("next_retry"),
                "state": poll.get("state"),
                "last_update": self.last_update,
                "delta_refusals": poll.get("delta_refusals", 0),
                "last_delta_refused": poll.get("last_delta_refused"),
                "user_match": self.cfg.bundle_user_match}

