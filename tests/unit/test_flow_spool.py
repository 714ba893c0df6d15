"""The flow spool: bounds in memory and on disk, oldest records dropped
first and counted, the disk spool across a restart, bad spool files."""

from __future__ import annotations

import gzip
import json
import logging
import os
import stat

from aus.agent.flowspool import FlowSpool, encode, read_segment
from aus.core.flowrecord import FlowRecord


def rec(port: int, dst: str = "192.0.2.10") -> FlowRecord:
    return FlowRecord(login_uid=1000, user="alice", groups=["DEV"], process="curl",
                      dst=dst, proto="tcp", port=port, verdict="denied", rule="",
                      first_seen="2026-12-06T03:00:01Z", last_seen="2026-12-06T03:00:07Z",
                      count=2)


def recs(lo: int, hi: int) -> list[bytes]:
    return [encode(rec(p)) for p in range(lo, hi)]


def ports(batch) -> list[int]:
    return [json.loads(r)["port"] for r in batch.records]


def drain(spool: FlowSpool) -> tuple[list[int], int]:
    """Take and accept every batch: the ports in order, the dropped told."""
    seen, told = [], 0
    while (b := spool.take()) is not None:
        seen += ports(b)
        told += b.dropped
        spool.done(b)
    return seen, told


def test_memory_bound_drops_the_oldest_and_counts_them():
    s = FlowSpool(1000)
    s.add(recs(1, 1001))
    s.add(recs(1001, 2501), window_dropped=7)
    assert s.memory_records == 1000
    assert s.dropped_spool == 1500 and s.dropped_window == 7 and s.unreported == 1507
    seen, told = drain(s)
    assert seen == list(range(1501, 2501))       # the newest 1000, in order
    assert told == 1507 and s.unreported == 0 and s.memory_records == 0


def test_count_only_batch_and_nothing_to_tell():
    s = FlowSpool(1000)
    assert s.take() is None
    s.add([], window_dropped=3)
    b = s.take()
    assert b.records == [] and b.dropped == 3
    s.done(b)
    assert s.take() is None


def test_batches_hold_at_most_max_batch_records(monkeypatch):
    import aus.agent.flowspool as fs
    monkeypatch.setattr(fs, "MAX_BATCH_RECORDS", 300)
    s = FlowSpool(5000)
    s.add(recs(1, 1001))
    sizes = []
    while (b := s.take()) is not None:
        sizes.append(len(b.records))
        s.done(b)
    assert sizes == [300, 300, 300, 100]


def test_give_back_keeps_order_and_refused_counts():
    s = FlowSpool(1000)
    s.add(recs(1, 11))
    b = s.take()
    assert ports(b) == list(range(1, 11)) and s.memory_records == 10
    s.add(recs(11, 21))
    s.give_back(b)
    b = s.take()
    assert ports(b) == list(range(1, 21))
    s.refused(b)
    assert s.dropped_refused == 20 and s.unreported == 20 and s.memory_records == 0
    b = s.take()
    assert b.records == [] and b.dropped == 20


def test_batch_in_flight_counts_toward_the_bound():
    s = FlowSpool(1000)
    s.add(recs(1, 801))
    b = s.take()                      # 800 in flight
    s.add(recs(801, 1201))            # 400 more: 200 must go, the oldest not in flight
    assert s.memory_records == 1000 and s.dropped_spool == 200
    s.give_back(b)                    # back at the front, within the bound
    assert s.memory_records == 1000
    seen, told = drain(s)
    assert seen == list(range(1, 801)) + list(range(1001, 1201)) and told == 200


def test_disk_spill_keeps_everything_in_order(tmp_path):
    d = tmp_path / "flows"
    s = FlowSpool(1000, d, 1 << 30, workload="web-1")
    s.open()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for lo in range(1, 12001, 1000):
        s.add(recs(lo, lo + 1000))
    assert s.memory_records <= 1000
    files = sorted(os.listdir(d))
    assert files and all(stat.S_IMODE(os.stat(d / f).st_mode) == 0o600 for f in files)
    assert s.disk_records + s.memory_records == 12000 and s.dropped_spool == 0
    seen, told = drain(s)
    assert seen == list(range(1, 12001)) and told == 0
    assert os.listdir(d) == [] and s.disk_bytes == 0


def test_disk_bound_deletes_the_oldest_files(tmp_path):
    d = tmp_path / "flows"
    s = FlowSpool(1000, d, 40_000)
    s.open()
    for lo in range(1, 30001, 1000):
        s.add(recs(lo, lo + 1000))
    assert 0 < s.disk_bytes <= 40_000
    assert sum(f.stat().st_size for f in d.iterdir()) == s.disk_bytes
    lost = s.dropped_spool
    assert lost > 0 and s.unreported == lost
    seen, told = drain(s)
    assert seen == list(range(lost + 1, 30001))   # what is left is the newest
    assert told == lost


def test_disk_spool_survives_a_restart(tmp_path):
    d = tmp_path / "flows"
    s = FlowSpool(1000, d, 1 << 30, workload="web-1")
    s.open()
    s.add(recs(1, 2501), window_dropped=5)       # 1500 dropped? no: spilled
    b = s.take()                                 # a batch in flight at exit
    assert s.close() == 0
    assert s.take() is None                      # closed: nothing more goes out
    s.give_back(b)                               # a late answer changes nothing
    again = FlowSpool(1000, d, 1 << 30, workload="web-1")
    again.open()
    assert again.disk_records == 2500 and again.memory_records == 0
    seen, told = drain(again)
    assert seen == list(range(1, 2501)) and told == 5


def test_memory_only_spool_reports_what_exit_loses():
    s = FlowSpool(1000)
    s.add(recs(1, 101))
    assert s.close() == 100


def _segment(d, name, body: bytes):
    p = d / name
    p.write_bytes(body)
    p.chmod(0o600)
    return p


def test_corrupt_spool_files_are_set_aside_and_counted(tmp_path, caplog):
    d = tmp_path / "flows"
    d.mkdir(mode=0o700)
    good = gzip.compress(json.dumps({"format": 1, "workload": "w", "dropped": 2, "records": [
        json.loads(encode(rec(7)))]}).encode())
    bad_dst = gzip.compress(json.dumps({"format": 1, "workload": "w", "records": [
        dict(json.loads(encode(rec(8))), dst="not-an-address")]}).encode())
    _segment(d, "flows-000000000001-3.json.gz", b"not gzip at all")
    _segment(d, "flows-000000000002-1.json.gz", good[: len(good) // 2])
    _segment(d, "flows-000000000003-1.json.gz", bad_dst)
    _segment(d, "flows-000000000004-1.json.gz", good)
    _segment(d, ".tmp-000000000005", b"half written")
    s = FlowSpool(1000, d, 1 << 30)
    with caplog.at_level(logging.ERROR, logger="aus.agent.flowspool"):
        s.open()
        assert s.disk_records == 6 and not (d / ".tmp-000000000005").exists()
        b = s.take()
    # the file's own count, and the records of the files set aside
    assert ports(b) == [7] and b.dropped == 2 + 5
    assert s.dropped_corrupt == 5 and s.unreported == 5
    text = caplog.text
    assert "flows-000000000001-3.json.gz: not a gzip file" in text
    assert "flows-000000000002-1.json.gz: the gzip stream is cut short" in text
    assert "flows-000000000003-1.json.gz: not a flow batch: records.0.dst" in text
    assert sorted(p.name for p in d.glob("*.corrupt")) == [
        "flows-000000000001-3.json.gz.corrupt", "flows-000000000002-1.json.gz.corrupt",
        "flows-000000000003-1.json.gz.corrupt"]
    s.done(b)
    assert s.unreported == 0 and s.take() is None


def test_read_segment_refuses_a_symlink_and_a_bomb(tmp_path):
    target = tmp_path / "t.json.gz"
    target.write_bytes(gzip.compress(b"{}"))
    link = tmp_path / "flows-000000000001-1.json.gz"
    link.symlink_to(target)
    import pytest

    from aus.agent.flowspool import SpoolCorrupt
    with pytest.raises(SpoolCorrupt, match="cannot open"):
        read_segment(link)
    bomb = tmp_path / "bomb.json.gz"
    bomb.write_bytes(gzip.compress(b" " * (9 << 20)))
    with pytest.raises(SpoolCorrupt, match="larger than .* uncompressed"):
        read_segment(bomb)


def test_unusable_directory_means_memory_only(tmp_path, caplog):
    f = tmp_path / "file"
    f.write_text("x")
    s = FlowSpool(1000, f, 1 << 20)
    with caplog.at_level(logging.ERROR):
        s.open()
    assert not s.disk_ok and "not a directory" in s.disk_error
    s.add(recs(1, 1501))
    assert s.memory_records == 1000 and s.dropped_spool == 500


def test_loose_directory_mode_is_tightened(tmp_path):
    d = tmp_path / "flows"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    FlowSpool(1000, d, 1 << 20).open()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
