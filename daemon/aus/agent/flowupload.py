"""Uploading flow records to the policy server.

    POST <policy URL with its last segment "bundle" replaced by "flows">
    Authorization, X-Aus-Workload: as for the bundle (the same credentials)
    Content-Type: application/json
    Content-Encoding: gzip
    body: a FlowBatch (aus.core.flowrecord)

    200       accepted: the batch is forgotten, with the dropped count it told
    400, 413  refused for good: the batch is dropped, its records counted
    429       retried after Retry-After (at least), with back-off
    401/403/404, 5xx, network and TLS errors: retried with back-off and
              jitter; the credentials file is read again after 401/403

The daemon's main loop only calls :meth:`FlowUploader.submit`, which
appends to a deque and sets an event: it never waits on the network, the
disk or a lock held across either. Two threads do the rest: the spool
thread moves submitted records into the bounded :class:`FlowSpool`
(spilling to disk); the sender thread uploads one batch at a time,
oldest first. A black-holed server therefore holds up only the sender.
"""

from __future__ import annotations

import collections
import email.utils
import gzip
import logging
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

from ..core.errors import ConfigError, PolicySourceError
from ..core.flowrecord import FlowRecord
from .config import DaemonConfig
from .flowspool import Batch, FlowSpool, batch_json, encode
from .policysource import (
    Answer,
    Backoff,
    Client,
    http_error,
    read_credentials,
    server_fields,
    server_reason,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0          # for the server to store one batch
REPLY_LIMIT = 64 << 10
RETRY_AFTER_MAX = 600.0      # a Retry-After longer than this is cut to it
STOP_TIMEOUT = 2.0           # how long exit waits for a request in flight


def flows_url(bundle_url: str) -> str:
    """The flows endpoint next to a bundle URL: its last path segment
    ``bundle`` replaced by ``flows`` (query left out). Raises ConfigError
    for a URL that does not end in /bundle."""
    parts = urlsplit(bundle_url)
    head, sep, last = parts.path.rstrip("/").rpartition("/")
    if not sep or last != "bundle":
        raise ConfigError(
            f"policy {bundle_url}: flow upload needs a bundle URL ending in /bundle "
            "(the flows endpoint is found next to it); set flow_upload: false to "
            "upload nothing")
    return urlunsplit((parts.scheme, parts.netloc, f"{head}/flows", "", ""))


def retry_after(value: str | None, now: float) -> float:
    """Seconds a Retry-After header asks to wait (delta seconds or an
    HTTP date), between 0 and RETRY_AFTER_MAX; 0 when absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        secs = float(value)
    else:
        try:
            secs = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return 0.0
    return max(0.0, min(RETRY_AFTER_MAX, secs))


class FlowUploader:
    """A flow sink (``submit``) that uploads what it is given."""

    def __init__(self, url: str, credentials_path: Path, ca: Path | None, *,
                 spool_records: int, spool_dir: Path | None, spool_bytes: int,
                 backoff: Backoff | None = None, clock: Callable[[], float] = time.time):
        self.url = url
        self.credentials_path = credentials_path
        self.ca = ca
        self.clock = clock
        self.backoff = backoff or Backoff()
        self.spool = FlowSpool(spool_records, spool_dir, spool_bytes)
        self.client: Client | None = None
        self._inbox: collections.deque[tuple[list[FlowRecord], int]] = collections.deque()
        # The hand-over queue's size and losses, without a lock: each
        # counter has one writer (the main loop, or the spool thread).
        self._handed = self._queue_popped = self._queue_dropped = self._queue_window = 0
        self._taken = 0
        self._seen_dropped = self._seen_window = 0
        self._arrived = threading.Event()   # the spool thread has work
        self._sendable = threading.Event()    # the sender may have work
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._target = ""
        # status (written by the sender, read by anyone without a lock)
        self.batches_sent = 0
        self.records_sent = 0
        self.batches_refused = 0
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_refusal: str | None = None
        self.next_retry: float | None = None
        self._error_key: tuple | None = None

    # -- the sink (the main loop) --------------------------------------------------
    def submit(self, records: list[FlowRecord], dropped: int) -> None:
        """Hand over a closed window's records; returns at once. Should
        the spool thread fall behind by more than the memory bound, the
        oldest records handed over are dropped here (and counted)."""
        self._inbox.append((records, dropped))
        self._handed += len(records)
        while (excess := self._handed - self._queue_popped - self._taken
               - self.spool.max_records) > 0:
            try:
                old, window = self._inbox.popleft()
            except IndexError:
                break
            if len(old) > excess:
                # A window larger than the bound keeps its newest records.
                self._inbox.appendleft((old[excess:], window))
                old = old[:excess]
                window = 0
            self._queue_popped += len(old)
            self._queue_dropped += len(old)
            self._queue_window += window
        self._arrived.set()

    def queued(self) -> int:
        """Records handed over, not yet in the spool."""
        return max(0, self._handed - self._queue_popped - self._taken)

    # -- life ------------------------------------------------------------------------
    def start(self) -> None:
        """Read the credentials, take in the disk spool, start the threads."""
        self.client = Client(self.url, read_credentials(self.credentials_path), ca=self.ca)
        self._target = urlsplit(self.url).path
        self.spool.workload = self.client.workload
        self.spool.open()
        for name, fn in (("aus-flow-spool", self._spool_loop),
                         ("aus-flow-upload", self._send_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("uploading flow records to %s (spool: %d records in memory, %s)",
                 self.url, self.spool.max_records,
                 f"{self.spool.max_bytes} bytes in {self.spool.dir}"
                 if self.spool.disk_ok else "no disk")

    def stop(self) -> None:
        """End the threads (a request in flight is interrupted, waited
        for at most STOP_TIMEOUT) and keep what was not sent on disk."""
        self._stop.set()
        self._arrived.set()
        self._sendable.set()
        if self.client is not None:
            self.client.interrupt()
        deadline = time.monotonic() + STOP_TIMEOUT
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._drain()
        lost = self.spool.close()
        if lost:
            log.warning("flow upload: %d records not uploaded are lost at exit (no "
                        "usable flow_spool_dir)", lost)
        if self.client is not None:
            self.client.close()

    def status(self) -> dict:
        s = self.spool
        return {"url": self.url,
                "state": "error" if self._error_key else
                         ("ok" if self.last_success is not None else "idle"),
                "spooled": {"memory": s.memory_records, "queued": self.queued(),
                            "memory_max": s.max_records,
                            "disk": s.disk_records, "disk_bytes": s.disk_bytes,
                            "disk_max_bytes": s.max_bytes if s.dir is not None else None,
                            "dir": str(s.dir) if s.dir is not None else None,
                            "disk_error": s.disk_error},
                "batches_sent": self.batches_sent, "records_sent": self.records_sent,
                "batches_refused": self.batches_refused, "last_refusal": self.last_refusal,
                "last_success": self.last_success, "last_error": self.last_error,
                "last_error_at": self.last_error_at, "failures": self.backoff.failures,
                "next_retry": self.next_retry,
                "dropped": {"window": s.dropped_window, "spool": s.dropped_spool,
                            "refused": s.dropped_refused, "corrupt": s.dropped_corrupt,
                            "unreported": s.unreported}}

    # -- the spool thread ------------------------------------------------------------
    def _spool_loop(self) -> None:
        while not self._stop.is_set():
            self._arrived.wait()
            self._arrived.clear()
            self._drain()

    def _drain(self) -> None:
        lost, window = self._queue_dropped, self._queue_window
        if lost != self._seen_dropped or window != self._seen_window:
            self.spool.add([], window - self._seen_window, lost - self._seen_dropped)
            self._seen_dropped, self._seen_window = lost, window
        while self._inbox:
            try:
                records, dropped = self._inbox.popleft()
            except IndexError:
                return
            self._taken += len(records)
            encoded = []
            for r in records:
                try:
                    encoded.append(encode(r))
                except (TypeError, ValueError, AttributeError) as exc:
                    log.error("flow upload: a record that cannot be encoded is dropped: %s",
                              exc)
                    dropped += 1
            self.spool.add(encoded, dropped)
            self._sendable.set()

    # -- the sender thread -------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stop.is_set():
            delay = self.send_once()
            if delay is None:
                self._sendable.wait()
                self._sendable.clear()
            elif delay > 0:
                self.next_retry = self.clock() + delay
                self._stop.wait(delay)
                self.next_retry = None

    def send_once(self) -> float | None:
        """Upload the oldest batch. Returns None when there was nothing to
        send, else the pause before the next attempt (0: go on)."""
        batch = self.spool.take()
        if batch is None:
            return None
        if not batch.body:
            batch.body = gzip.compress(
                batch_json(self.client.workload, batch.dropped, batch.records), 6)
        try:
            ans = self.client.exchange(
                "POST", self._target,
                {"Content-Type": "application/json", "Content-Encoding": "gzip",
                 "Accept": "application/json"},
                batch.body, read_timeout=READ_TIMEOUT, limit=REPLY_LIMIT,
                cancel=self._stop, connect_timeout=CONNECT_TIMEOUT, retry_stale=False)
        except PolicySourceError as exc:
            self.spool.give_back(batch)
            return None if self._stop.is_set() else self._failed(exc)
        finally:
            # A batch is a new connection: servers drop idle ones sooner than
            # the next window closes, and a POST is not resent blindly.
            self.client.close()
        if ans.status == 200:
            self._accepted(batch)
            return 0.0
        if ans.status in (400, 413):
            self._refused(batch, ans)
            # a refused count-only batch is not resent at once, it would spin
            return 0.0 if batch.records else self.backoff.next()
        self.spool.give_back(batch)
        if ans.status in (401, 403):
            try:
                self.client.set_credentials(read_credentials(self.credentials_path))
            except ConfigError as exc:
                log.error("%s", exc)
        delay = self._failed(http_error(ans, "the policy server"))
        if ans.status == 429:
            delay = max(delay, retry_after(ans.headers.get("retry-after"), self.clock()))
        return delay

    def _accepted(self, batch: Batch) -> None:
        self.spool.done(batch)
        self.batches_sent += 1
        self.records_sent += len(batch.records)
        self.last_success = self.clock()
        self.backoff.reset()
        if self._error_key is not None:
            log.info("flow upload to %s works again", self.url)
        self._error_key = None
        self.last_error = None

    def _refused(self, batch: Batch, ans: Answer) -> None:
        self.spool.refused(batch)
        self.batches_refused += 1
        reason = f"HTTP {ans.status}: {server_reason(ans.body) or ans.reason}"
        fields = server_fields(ans.body)
        if fields:
            reason += f" [fields: {fields}]"
        if reason != self.last_refusal:   # once per reason, not per batch
            log.error("flow upload: the policy server refused a batch of %d records (%s); "
                      "they are dropped and counted", len(batch.records), reason)
        self.last_refusal = reason
        self.last_success = self.clock()
        self.backoff.reset()
        self._error_key = None

    def _failed(self, exc: PolicySourceError) -> float:
        delay = self.backoff.next()
        key = (exc.kind, exc.status, str(exc))
        if key != self._error_key:   # once per state change, not per retry
            log.warning("flow upload: %s; records stay spooled; retrying with back-off "
                        "up to %d s", exc, int(self.backoff.hi))
        else:
            log.debug("flow upload: %s; retry in %.1f s", exc, delay)
        self._error_key = key
        self.last_error = str(exc)
        self.last_error_at = self.clock()
        return delay


def uploader_for(cfg: DaemonConfig) -> FlowUploader | None:
    """The uploader ausd.yaml asks for: None with a policy file or
    ``flow_upload: false`` (the configuration has checked the URL)."""
    if not cfg.policy_url or not cfg.flow_upload:
        return None
    return FlowUploader(flows_url(cfg.policy_url), cfg.policy_credentials, cfg.policy_ca,
                        spool_records=cfg.flow_spool_records, spool_dir=cfg.flow_spool_dir,
                        spool_bytes=cfg.flow_spool_bytes)
