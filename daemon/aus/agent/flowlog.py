"""Local export of flow records for SIEMs (``flow_log:`` in ausd.yaml).

Two sinks, each called by the daemon at a window close with the window's
records (see flowrecords.Aggregator):

- :class:`JournalSink`: one journald entry per record, sent over the native
  journal protocol (datagrams of ``KEY=value`` lines) to
  /run/systemd/journal/socket, with the fields ``AUS_USER``,
  ``AUS_LOGIN_UID``, ``AUS_DST``, ``AUS_PORT``, ``AUS_PROTO``,
  ``AUS_VERDICT``, ``AUS_RULE`` and more, ``MESSAGE`` and ``PRIORITY``.
  The socket is non-blocking: a full journal costs the entries that did
  not fit, counted, never a wait.
- :class:`FileSink`: JSON lines appended to a file that is rotated by size
  (``flows.jsonl`` -> ``flows.jsonl.1`` ... ``.keep``).

Each sink formats and writes in a thread of its own, fed by a bounded
queue: the daemon's loop only queues a window (a few microseconds). The
thread touches nothing but its queue, its file or socket and its
counters. When the export falls more than QUEUED windows behind, a new
window is not queued and its records count as failures.

Failures are counted and logged once when they start (and once when the
export works again), never once per record.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import socket
import threading
from pathlib import Path

from ..core import journal
from ..core.flowrecord import FlowRecord, iso
from .config import JOURNAL_SOCKET

log = logging.getLogger(__name__)

SYSLOG_IDENTIFIER = "ausd"
PRIORITY = {"allowed": 6, "would_deny": 5, "denied": 4}   # info, notice, warning
QUEUED = 4          # windows waiting for the export thread at most


class _Failures:
    """Counts failures; logs the first of a run and the recovery."""

    def __init__(self, what: str):
        self.what = what
        self.lock = threading.Lock()    # the loop and the export thread count
        self.count = 0
        self.failing = False
        self.last_error = ""

    def failed(self, n: int, error: str) -> None:
        with self.lock:
            self.count += n
            self.last_error = error
            first, self.failing = not self.failing, True
        if first:
            log.error("flow log: %s failed: %s (counted in ausctl status; logged again "
                      "when it works)", self.what, error)

    def worked(self) -> None:
        if self.failing:
            self.failing = False
            log.info("flow log: %s works again (%d records lost so far)",
                     self.what, self.count)


class _Exporter:
    """The queue and thread every sink shares; subclasses write()."""

    what = "export"

    def __init__(self):
        self.failures = _Failures(self.what)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUED)
        self._thread: threading.Thread | None = None

    def __call__(self, records: list[FlowRecord], dropped: int) -> None:
        """Called by the daemon's loop: queue the window, never wait."""
        if not records:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="aus-flow-log", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(records)
        except queue.Full:
            self.failures.failed(len(records), f"{QUEUED} windows already wait for the "
                                 "export (it is slower than the traffic)")

    def _run(self) -> None:
        while True:
            records = self._queue.get()
            try:
                if records is None:
                    return
                self.write(records)
            except Exception:    # a bug costs the window, not the export
                log.exception("flow log: %s", self.what)
                self.failures.failed(len(records), "internal error; see the log")
            finally:
                self._queue.task_done()

    def write(self, records: list[FlowRecord]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Wait until every queued window is written (tests, exit)."""
        if self._thread is not None:
            self._queue.join()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most ``timeout`` seconds), then stop."""
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)


def journal_entry(r: FlowRecord) -> bytes:
    """One record as a native-protocol datagram."""
    port = f":{r.port}" if r.proto in ("tcp", "udp") else ""
    rule = f" by rule {r.rule}" if r.rule else ""
    message = (f"{r.verdict} {r.user or 'login UID ' + str(r.login_uid)} -> "
               f"{r.dst}{port}/{r.proto}{rule} x{r.count} ({r.process})")
    fields = [("MESSAGE", message), ("PRIORITY", PRIORITY[r.verdict]),
              ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
              ("AUS_USER", r.user), ("AUS_LOGIN_UID", r.login_uid),
              ("AUS_GROUPS", ",".join(r.groups)), ("AUS_PROCESS", r.process),
              ("AUS_DST", r.dst), ("AUS_PORT", r.port), ("AUS_PROTO", r.proto),
              ("AUS_VERDICT", r.verdict), ("AUS_RULE", r.rule),
              ("AUS_COUNT", r.count), ("AUS_FIRST_SEEN", iso(r.first_seen)),
              ("AUS_LAST_SEEN", iso(r.last_seen))]
    return journal.entry(fields)


class JournalSink(_Exporter):
    def __init__(self, path: Path = JOURNAL_SOCKET):
        self.path = str(path)
        self.what = f"journal at {self.path}"
        super().__init__()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.sent = 0

    def write(self, records: list[FlowRecord]) -> None:
        lost, error = 0, ""
        for i, r in enumerate(records):
            try:
                self.sock.sendto(journal_entry(r), self.path)
                self.sent += 1
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                    lost += 1
                    error = "the journal's socket is full"
                    continue
                # No journal (or no permission): the rest would fail alike.
                lost += len(records) - i
                error = exc.strerror or str(exc)
                break
        if lost:
            self.failures.failed(lost, error)
        elif records:
            self.failures.worked()

    def status(self) -> dict:
        return {"kind": "journal", "socket": self.path, "sent": self.sent,
                "failures": self.failures.count, "last_error": self.failures.last_error}

    def close(self, timeout: float = 2.0) -> None:
        super().close(timeout)
        self.sock.close()


class FileSink(_Exporter):
    """JSON lines in ``path``; before a write would take the file past
    ``max_bytes`` it is rotated, keeping ``keep`` old files."""

    def __init__(self, path: Path, max_bytes: int, keep: int):
        self.path, self.max_bytes, self.keep = Path(path), max_bytes, keep
        self.what = f"file {self.path}"
        super().__init__()
        self.written = 0
        self.rotations = 0

    def _rotate(self) -> None:
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.keep:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self.rotations += 1

    def write(self, records: list[FlowRecord]) -> None:
        lines = [(json.dumps(r.wire(), sort_keys=True) + "\n").encode() for r in records]
        i = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            while i < len(lines):
                try:
                    size = self.path.stat().st_size
                except FileNotFoundError:
                    size = 0
                # As many lines as fit; a file always takes at least one.
                chunk, room = [], self.max_bytes - size
                while i < len(lines) and (len(lines[i]) <= room or (not chunk and size == 0)):
                    chunk.append(lines[i])
                    room -= len(lines[i])
                    i += 1
                if chunk:
                    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                 | os.O_CLOEXEC, 0o640)
                    try:
                        os.write(fd, b"".join(chunk))
                    finally:
                        os.close(fd)
                    self.written += len(chunk)
                if i < len(lines):
                    self._rotate()
        except OSError as exc:
            self.failures.failed(len(lines) - i, f"{exc.strerror or exc}")
            return
        self.failures.worked()

    def status(self) -> dict:
        return {"kind": "file", "path": str(self.path), "written": self.written,
                "rotations": self.rotations, "failures": self.failures.count,
                "last_error": self.failures.last_error}


def sink_of(cfg) -> JournalSink | FileSink | None:
    """The sink ``flow_log`` names (a config.FlowLog), or None (off)."""
    if cfg is None:
        return None
    if cfg.journal is not None:
        return JournalSink(cfg.journal)
    return FileSink(cfg.path, cfg.max_bytes, cfg.keep)
