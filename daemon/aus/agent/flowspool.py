"""The spool of flow records waiting for upload: bounded in memory, and
optionally on disk, oldest records dropped first and counted.

Records are kept as their JSON text (one ``bytes`` per record, the wire
form of :class:`~aus.core.flowrecord.FlowRecord`), so a batch is a join.
Order, oldest first: the disk segments, then memory. When memory holds
more than ``max_records``, its oldest records go to a new disk segment
(without a disk spool: they are dropped); when the segments take more
than ``max_bytes``, the oldest segment is deleted. Every record dropped
is counted, and the count travels in the ``dropped`` field of the next
batch the server accepts.

A segment is one ready-made batch: ``flows-<seq>-<records>.json.gz``, a
gzip ``FlowBatch`` document, mode 0600 in a directory of mode 0700,
written to a temporary name and renamed, so a crash leaves no half
file. Each is read back and validated before it is sent; a file that
fails is renamed ``*.corrupt``, logged, and its records counted as
dropped. At exit the records in memory are written to a segment, and
uploaded after the next start.

Thread use: one thread adds (:meth:`add`), one sends (:meth:`take`,
then :meth:`done`, :meth:`refused` or :meth:`give_back`); ``status``
reads plain counters without the lock, so a reader never waits.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import os
import re
import stat
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from ..core.flowrecord import (
    FLOW_FORMAT,
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    FlowBatch,
    FlowRecord,
)
from .privatefile import write_atomic

log = logging.getLogger(__name__)

SEGMENT_RE = re.compile(r"^flows-(\d{12})-(\d{1,7})\.json\.gz$")
CORRUPT_SUFFIX = ".corrupt"
BATCH_OVERHEAD = 512        # bytes of a batch besides its records (format, workload, ...)


def encode(record: FlowRecord) -> bytes:
    """A record's wire JSON, compact."""
    return json.dumps(record.wire(), separators=(",", ":"), ensure_ascii=False).encode()


def batch_json(workload: str, dropped: int, records: list[bytes]) -> bytes:
    """A FlowBatch document made of already encoded records."""
    head = json.dumps({"format": FLOW_FORMAT, "workload": workload, "dropped": dropped},
                      separators=(",", ":"), ensure_ascii=False).encode()
    return head[:-1] + b',"records":[' + b",".join(records) + b"]}"


@dataclass
class Segment:
    path: Path
    seq: int
    records: int
    size: int


@dataclass
class Batch:
    """Records taken for one upload. ``dropped`` is what it reports:
    ``pending`` of it taken from the unreported count, the rest carried
    by its segment."""
    records: list[bytes]
    dropped: int
    pending: int
    segment: Segment | None = None
    body: bytes = field(default=b"", repr=False)


class SpoolCorrupt(Exception):
    pass


class FlowSpool:
    def __init__(self, max_records: int, directory: Path | None = None,
                 max_bytes: int = 0, workload: str = "-"):
        self.max_records = max_records
        self.dir = directory
        self.max_bytes = max_bytes
        self.workload = workload
        self._lock = threading.Lock()
        self._mem: collections.deque[bytes] = collections.deque()
        self._segments: list[Segment] = []       # oldest first
        self._corrupt: list[tuple[Path, int]] = []
        self._seq = 0
        self._inflight: Batch | None = None
        self._closed = False
        self.disk_ok = False
        self.disk_error: str | None = None
        # counters (written under the lock, read without it)
        self.memory_records = 0       # in memory, the batch in flight included
        self.disk_records = 0
        self.disk_bytes = 0
        self.unreported = 0           # dropped, not yet told to the server
        self.dropped_window = 0       # by the aggregator's window cap (reported to us)
        self.dropped_spool = 0        # by the bounds of this spool
        self.dropped_refused = 0      # in batches the server refused (400/413)
        self.dropped_corrupt = 0      # in spool files that could not be read

    # -- the disk spool ----------------------------------------------------------
    def open(self) -> None:
        """Use the directory: create it (0700) if missing, take in the
        segments a previous run left. A directory that cannot be used
        leaves the spool in memory only (logged, shown in status)."""
        if self.dir is None:
            return
        try:
            self._check_dir()
            found = []
            for entry in os.scandir(self.dir):
                m = SEGMENT_RE.match(entry.name)
                if entry.name.startswith(".tmp-"):
                    os.unlink(entry.path)          # a write cut short by a crash
                elif m and entry.is_file(follow_symlinks=False):
                    found.append(Segment(Path(entry.path), int(m[1]), int(m[2]),
                                         entry.stat(follow_symlinks=False).st_size))
                elif entry.name.endswith(CORRUPT_SUFFIX):
                    self._corrupt.append((Path(entry.path),
                                          entry.stat(follow_symlinks=False).st_size))
        except OSError as exc:
            self._disk_failed(f"cannot use {self.dir}: {exc.strerror or exc}")
            return
        except SpoolCorrupt as exc:
            self._disk_failed(str(exc))
            return
        with self._lock:
            self.disk_ok = True
            self._segments = sorted(found, key=lambda s: s.seq)
            self._seq = self._segments[-1].seq + 1 if self._segments else 0
            self._count_disk()
            self._bound_disk()
        if self._segments:
            log.info("flow spool %s: %d records in %d files left by the last run; "
                     "uploading them first", self.dir, self.disk_records, len(self._segments))

    def _check_dir(self) -> None:
        assert self.dir is not None
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(self.dir)
        if not stat.S_ISDIR(st.st_mode):
            raise SpoolCorrupt(f"flow_spool_dir {self.dir}: not a directory")
        if st.st_uid != os.geteuid():
            raise SpoolCorrupt(f"flow_spool_dir {self.dir}: owned by uid {st.st_uid}, "
                               f"not by ausd's uid {os.geteuid()}")
        if st.st_mode & 0o077:
            os.chmod(self.dir, 0o700)   # spooled records name users and destinations

    def _disk_failed(self, why: str) -> None:
        self.disk_ok = False
        if why != self.disk_error:
            log.error("flow spool: %s; keeping records in memory only", why)
        self.disk_error = why

    def _count_disk(self) -> None:
        self.disk_records = sum(s.records for s in self._segments)
        self.disk_bytes = sum(s.size for s in self._segments) + sum(n for _, n in self._corrupt)

    def _write_segment(self, records: list[bytes], dropped: int) -> bool:
        """Append a segment holding ``records`` (under the lock)."""
        assert self.dir is not None
        seq = self._seq
        self._seq += 1
        path = self.dir / f"flows-{seq:012d}-{len(records)}.json.gz"
        tmp = self.dir / f".tmp-{seq:012d}"
        body = gzip.compress(batch_json(self.workload, dropped, records), 6)
        try:
            write_atomic(path, body, tmp, sync_dir=False)
        except OSError as exc:
            self._disk_failed(f"cannot write {path}: {exc.strerror or exc}")
            return False
        self._segments.append(Segment(path, seq, len(records), len(body)))
        self._count_disk()
        return True

    def _bound_disk(self) -> None:
        """Delete the oldest files until the spool fits ``max_bytes``
        (corrupt ones first; never the segment being sent)."""
        while self.disk_bytes > self.max_bytes and self._corrupt:
            path, _ = self._corrupt.pop(0)
            _unlink(path)
            self._count_disk()
        inflight = self._inflight.segment if self._inflight is not None else None
        while self.disk_bytes > self.max_bytes:
            victim = next((s for s in self._segments if s is not inflight), None)
            if victim is None:
                break
            self._segments.remove(victim)
            _unlink(victim.path)
            self._count_disk()
            self._dropped(victim.records, "the disk spool is full")

    def _dropped(self, n: int, why: str) -> None:
        if n:
            self.unreported += n
            self.dropped_spool += n
            log.debug("flow spool: %d oldest records dropped: %s", n, why)

    # -- adding (the spool thread) -------------------------------------------------
    def add(self, records: list[bytes], window_dropped: int = 0, lost: int = 0) -> None:
        """Take in records (and the counts dropped before they got here: by
        the window cap, ``lost`` on the way); past ``max_records`` in
        memory, the oldest go to disk or are dropped."""
        with self._lock:
            if self._closed:
                return
            self.unreported += window_dropped + lost
            self.dropped_window += window_dropped
            self.dropped_spool += lost
            self._mem.extend(records)
            self._bound_memory()

    def _bound_memory(self) -> None:
        held = len(self._inflight.records) \
            if self._inflight is not None and self._inflight.segment is None else 0
        limit = max(0, self.max_records - held)
        while len(self._mem) > limit:
            if self.disk_ok:
                chunk = _chunk(self._mem)
                if self._write_segment(chunk, 0):
                    self._bound_disk()
                    continue
                self._mem.extendleft(reversed(chunk))
            over = len(self._mem) - limit
            for _ in range(over):
                self._mem.popleft()
            self._dropped(over, "the memory spool is full")
        self.memory_records = len(self._mem) + held

    # -- sending (the sender thread) -------------------------------------------------
    def take(self) -> Batch | None:
        """The oldest records, as one batch (the oldest disk segment, else
        up to MAX_BATCH_RECORDS from memory, else only a count of dropped
        records); None when there is nothing to tell."""
        while True:
            with self._lock:
                if self._closed or self._inflight is not None:
                    return None
                if self._segments:
                    seg = self._segments[0]
                    batch = self._inflight = Batch([], 0, self.unreported, seg)
                elif self._mem:
                    batch = self._inflight = Batch(_chunk(self._mem), self.unreported,
                                                   self.unreported)
                    return batch
                elif self.unreported:
                    batch = self._inflight = Batch([], self.unreported, self.unreported)
                    return batch
                else:
                    return None
            try:   # outside the lock: reading and validating takes a while
                records, dropped = read_segment(seg.path)
            except SpoolCorrupt as exc:
                self._set_aside(seg, str(exc))
                continue
            batch.records, batch.dropped = records, dropped + batch.pending
            return batch

    def _set_aside(self, seg: Segment, why: str) -> None:
        log.error("flow spool: %s: %s; set aside as %s%s, its %d records counted as "
                  "dropped", seg.path, why, seg.path.name, CORRUPT_SUFFIX, seg.records)
        with self._lock:
            self._inflight = None
            if seg in self._segments:
                self._segments.remove(seg)
            bad = seg.path.with_name(seg.path.name + CORRUPT_SUFFIX)
            try:
                os.rename(seg.path, bad)
                self._corrupt.append((bad, seg.size))
            except OSError:
                _unlink(seg.path)
            self.unreported += seg.records
            self.dropped_corrupt += seg.records
            self._count_disk()

    def done(self, batch: Batch) -> None:
        """The server accepted ``batch``: forget it and the count it told."""
        with self._lock:
            self._inflight = None
            self.unreported = max(0, self.unreported - batch.pending)
            if batch.segment is not None and batch.segment in self._segments:
                self._segments.remove(batch.segment)
                _unlink(batch.segment.path)
                self._count_disk()
            self.memory_records = len(self._mem)

    def refused(self, batch: Batch) -> None:
        """The server refused ``batch`` for good (400/413): its records
        are dropped and counted (its dropped count stays to be told)."""
        carried = batch.dropped - batch.pending
        with self._lock:
            self._inflight = None
            self.unreported += len(batch.records) + carried
            self.dropped_refused += len(batch.records)
            if batch.segment is not None and batch.segment in self._segments:
                self._segments.remove(batch.segment)
                _unlink(batch.segment.path)
                self._count_disk()
            self.memory_records = len(self._mem)

    def give_back(self, batch: Batch) -> None:
        """Sending ``batch`` failed for now: its records are the oldest
        again (and the first dropped if the spool overflows meanwhile)."""
        with self._lock:
            self._inflight = None
            if self._closed:
                return
            if batch.segment is None:
                self._mem.extendleft(reversed(batch.records))
                self._bound_memory()

    # -- exit ------------------------------------------------------------------------
    def close(self) -> int:
        """Write what memory holds (the batch in flight included) and the
        unreported count to disk, for the next run; returns the number of
        records lost (no usable disk spool)."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            if self._inflight is not None and self._inflight.segment is None:
                self._mem.extendleft(reversed(self._inflight.records))
            self._inflight = None
            if not self.disk_ok:
                lost = len(self._mem)
                self._mem.clear()
                self.memory_records = 0
                return lost
            written = 0
            while self._mem or self.unreported:
                chunk = _chunk(self._mem)
                if not self._write_segment(chunk, self.unreported):
                    self._mem.extendleft(reversed(chunk))
                    break
                written += len(chunk)
                self.unreported = 0
            self._bound_disk()
            lost = len(self._mem)
            self._mem.clear()
            self.memory_records = 0
        if written:
            log.info("flow spool: %d records not uploaded yet kept in %s for the next "
                     "start", written, self.dir)
        return lost


def _chunk(mem: collections.deque[bytes]) -> list[bytes]:
    """Pop the oldest records that fit one batch."""
    out: list[bytes] = []
    size = BATCH_OVERHEAD
    while mem and len(out) < MAX_BATCH_RECORDS:
        n = len(mem[0]) + 1
        if out and size + n > MAX_BATCH_BYTES:
            break
        out.append(mem.popleft())
        size += n
    return out


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_segment(path: Path) -> tuple[list[bytes], int]:
    """The records and dropped count of one spool file, validated as a
    FlowBatch. Raises SpoolCorrupt saying what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SpoolCorrupt(f"cannot open: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpoolCorrupt("not a regular file")
        if st.st_size > MAX_BATCH_BYTES:
            raise SpoolCorrupt(f"larger than {MAX_BATCH_BYTES} bytes")
        with os.fdopen(os.dup(fd), "rb") as fh:
            raw = fh.read(MAX_BATCH_BYTES + 1)
    except OSError as exc:
        raise SpoolCorrupt(f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        inflate = zlib.decompressobj(wbits=31)
        text = inflate.decompress(raw, MAX_BATCH_BYTES + 1)
        if len(text) > MAX_BATCH_BYTES or inflate.unconsumed_tail:
            raise SpoolCorrupt(f"larger than {MAX_BATCH_BYTES} bytes uncompressed")
        if not inflate.eof:
            raise SpoolCorrupt("the gzip stream is cut short")
    except zlib.error as exc:
        raise SpoolCorrupt(f"not a gzip file: {exc}") from exc
    try:
        batch = FlowBatch.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise SpoolCorrupt(f"not a flow batch: {where}: {first['msg']} "
                           f"({exc.error_count()} in all)") from exc
    return [encode(r) for r in batch.records], batch.dropped
