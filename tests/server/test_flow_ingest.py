"""POST /api/orgs/{org}/flows: validation, merging, org isolation and
retention, on SQLite and on PostgreSQL (the ``server`` fixture)."""

from __future__ import annotations

import datetime as dt
import gzip
import json

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from aus.core.flowrecord import (
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    FlowRecord,
)
from aus.server.db import Flow, open_database
from aus.server.flowstore import FlowStore, merge_records
from tests.support.flow_posts import HOUR, NOW, batch, credentials_file, post, record
from tests.support.polling import wait_until


def rows(server, org: str | None = None) -> list[Flow]:
    engine, sessions = open_database(server.db_url)
    try:
        with sessions() as s:
            q = select(Flow).order_by(Flow.hour, Flow.dst, Flow.port, Flow.verdict)
            if org is not None:
                q = q.where(Flow.org_id == org)
            return list(s.scalars(q))
    finally:
        engine.dispose()


def utc(t: dt.datetime) -> dt.datetime:
    """A stored time as an aware UTC datetime (SQLite gives them back naive)."""
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


# --------------------------------------------------------------------------
# Accepted batches


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "identity"])
def test_a_batch_is_stored_as_rows(server, gz):
    r = post(server, batch([record(), record(dst="192.0.2.11", verdict="allowed", rule="web")]),
             gz=gz)
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 2, "rows": 2, "expired": 0}
    got = rows(server)
    assert [(f.org_id, f.workload, f.user_name, f.dst, f.verdict, f.rule, f.count) for f in got] == [
        ("1", "web-1", "alice", "192.0.2.10", "would_deny", "", 1),
        ("1", "web-1", "alice", "192.0.2.11", "allowed", "web", 1)]
    assert utc(got[0].hour) == HOUR
    assert got[0].groups == ["DEV"] and got[0].process == "curl" and got[0].login_uid == 1000


def test_same_key_across_batches_merges_into_one_row(server):
    t0 = HOUR + dt.timedelta(minutes=5)
    assert post(server, batch([record(first=t0, last=t0 + dt.timedelta(seconds=9), count=3)])
                ).status_code == 200
    # newer: its groups and process win; count adds; last_seen grows
    r = post(server, batch([record(first=t0 + dt.timedelta(minutes=1),
                                   last=t0 + dt.timedelta(minutes=2), count=4,
                                   groups=["DEV", "OPS"], process="wget")]))
    assert r.json() == {"accepted": 1, "rows": 1, "expired": 0}
    # older and late: first_seen shrinks, but groups/process stay the newest's
    r = post(server, batch([record(first=t0 - dt.timedelta(minutes=1),
                                   last=t0 - dt.timedelta(seconds=30), count=2,
                                   groups=["OLD"], process="nc")]))
    assert r.status_code == 200
    (f,) = rows(server)
    assert f.count == 9
    assert utc(f.first_seen) == t0 - dt.timedelta(minutes=1)
    assert utc(f.last_seen) == t0 + dt.timedelta(minutes=2)
    assert f.groups == ["DEV", "OPS"] and f.process == "wget"


def test_same_key_within_one_batch_is_merged_before_insert(server):
    t0 = HOUR + dt.timedelta(minutes=1)
    recs = [record(first=t0 + dt.timedelta(seconds=i), last=t0 + dt.timedelta(seconds=i + 1),
                   count=i + 1, process=f"p{i}") for i in range(10)]
    r = post(server, batch(recs[::-1]))   # out of order on the wire
    assert r.json() == {"accepted": 10, "rows": 1, "expired": 0}
    (f,) = rows(server)
    assert f.count == 55 and f.process == "p9"
    assert utc(f.first_seen) == t0 and utc(f.last_seen) == t0 + dt.timedelta(seconds=10)


def test_each_part_of_the_key_and_the_hour_make_a_row_of_their_own(server):
    prev = HOUR - dt.timedelta(hours=1)
    variants = [record(), record(login_uid=1001), record(user="bob"), record(dst="2001:db8::1"),
                record(proto="udp"), record(port=53), record(verdict="denied"), record(rule="web"),
                record(first=prev + dt.timedelta(minutes=59, seconds=50))]
    assert post(server, batch(variants)).json()["rows"] == len(variants)
    assert post(server, batch(variants, workload="web-2")).json()["rows"] == len(variants)
    got = rows(server)
    assert len(got) == 2 * len(variants)
    assert sum(1 for f in got if utc(f.hour) == prev) == 2
    # the same again merges into the same rows
    assert post(server, batch(variants)).status_code == 200
    got = rows(server)
    assert len(got) == 2 * len(variants)
    assert sorted(f.count for f in got) == [1] * len(variants) + [2] * len(variants)


def test_storage_grows_with_distinct_flows_not_connections(server):
    keys = [dict(dst=f"198.51.100.{i}", port=p) for i in range(5) for p in (22, 443)]
    for n in range(20):
        t = HOUR + dt.timedelta(seconds=10 * n)
        recs = [record(first=t, last=t + dt.timedelta(seconds=1), count=7, **k) for k in keys]
        assert post(server, batch(recs)).status_code == 200
    got = rows(server)
    assert len(got) == len(keys)
    assert all(f.count == 20 * 7 for f in got)


def test_merge_records_sums_and_keeps_the_newest_groups():
    t = HOUR + dt.timedelta(minutes=3)
    a = FlowRecord.model_validate(record(first=t, last=t + dt.timedelta(seconds=5), count=2,
                                         groups=["B"]))
    b = FlowRecord.model_validate(record(first=t - dt.timedelta(seconds=30), last=t, count=5,
                                         groups=["A"]))
    (row,) = merge_records("1", "w", [a, b])
    assert row["count"] == 7 and row["groups"] == ["B"]
    assert row["first_seen"] == t - dt.timedelta(seconds=30)
    assert row["last_seen"] == t + dt.timedelta(seconds=5)


# --------------------------------------------------------------------------
# Refused batches: a reason, and nothing stored


def _refused(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    for w in words:
        assert w in err["message"] or any(w in f["field"] for f in err["fields"]), err
    return err


def test_wrong_field_types_name_the_record_and_field(server):
    good = record()
    r = post(server, batch([good, record(port="https"), record(dst="not-an-ip"),
                            record(count=0)]))
    err = _refused(r, 400, "records[1].port")
    fields = {f["field"] for f in err["fields"]}
    assert {"records[1].port", "records[2].dst", "records[3].count"} <= fields
    assert "not valid" in err["message"]
    assert rows(server) == []


def test_bad_json_and_bad_gzip_are_refused(server):
    _refused(post(server, None, raw=b'{"format": 1, "records": [', gz=False), 400, "JSON")
    _refused(post(server, None, raw=gzip.compress(b'{"format": 1, "wor'), encoding="gzip"),
             400, "line 1")
    _refused(post(server, None, raw=b"\x1f\x8b\x08\x00garbage-not-deflate", encoding="gzip"),
             400, "gzip")
    whole = gzip.compress(json.dumps(batch([record()])).encode())
    _refused(post(server, None, raw=whole[:-12], encoding="gzip"), 400, "cut short")
    _refused(post(server, None, raw=whole + whole, encoding="gzip"), 400, "after its end")
    _refused(post(server, None, raw=json.dumps(batch([record()])).encode(), encoding="br"),
             415, "Content-Encoding")
    _refused(post(server, None, raw=json.dumps([1, 2]).encode(), gz=False), 400, "body")
    _refused(post(server, None, raw=json.dumps(batch([record()]) | {"extra": 1}).encode(),
                  gz=False), 400, "extra")
    assert rows(server) == []


def test_a_record_too_far_ahead_is_refused(server):
    late = NOW + dt.timedelta(days=2)
    err = _refused(post(server, batch([record(), record(first=late)])), 400,
                   "records[1].last_seen")
    assert "ahead" in err["message"]
    assert rows(server) == []


def test_too_many_records_are_refused(server):
    recs = [record(port=i % 65536) for i in range(MAX_BATCH_RECORDS + 1)]
    err = _refused(post(server, batch(recs)), 400, "records")
    assert str(MAX_BATCH_RECORDS) in err["message"]
    assert rows(server) == []


def test_a_zip_bomb_is_refused_at_the_cap(server):
    body = b'{"format": 1, "workload": "w", "records": [], "pad": "' + \
        b" " * (MAX_BATCH_BYTES + 1024) + b'"}'
    bomb = gzip.compress(body, 9)
    assert len(bomb) < MAX_BATCH_BYTES // 500
    _refused(post(server, None, raw=bomb, encoding="gzip"), 413, "inflates to more than")
    _refused(post(server, None, raw=body, gz=False), 413, "larger than")
    assert rows(server) == []


def test_an_empty_body_is_refused(server):
    _refused(post(server, None, raw=b"", gz=False), 400, "empty")


# --------------------------------------------------------------------------
# Keys and orgs


def test_bad_keys_get_401_and_store_nothing(server):
    doc = batch([record()])
    for token in ("nokey:nosecret", server.token.split(":")[0] + ":wrong"):
        r = post(server, doc, token=token)
        assert r.status_code == 401, r.text
    r = server.client.post(f"{server.api}/flows", content=gzip.compress(json.dumps(doc).encode()),
                           headers={"Content-Encoding": "gzip"})
    assert r.status_code == 401
    assert rows(server) == []


def test_an_orgs_key_never_writes_another_orgs_flows(server):
    r = post(server, batch([record(user="mallory")]), token=server.other_token, org="1")
    assert r.status_code == 403, r.text
    assert rows(server) == []
    assert post(server, batch([record()]), org="1").status_code == 200
    assert post(server, batch([record(user="carol")]), token=server.other_token,
                org="2").status_code == 200
    assert [(f.org_id, f.user_name) for f in rows(server, "1")] == [("1", "alice")]
    assert [(f.org_id, f.user_name) for f in rows(server, "2")] == [("2", "carol")]
    # the same key in two orgs is two rows, never merged across orgs
    assert post(server, batch([record()]), token=server.other_token, org="2").status_code == 200
    assert [f.count for f in rows(server, "1")] == [1]


# --------------------------------------------------------------------------
# Retention


def _day(days_ago: int) -> dt.datetime:
    d = (NOW - dt.timedelta(days=days_ago)).date()
    return dt.datetime(d.year, d.month, d.day, 12, tzinfo=dt.timezone.utc)


def test_retention_removes_whole_days_past_it(server):
    engine, _ = open_database(server.db_url)
    try:
        store = FlowStore(engine, retention_days=2)
        for ago in (5, 3, 2, 1, 0):
            t = _day(ago)
            assert post(server, batch([record(first=t, last=t, dst=f"203.0.113.{ago}")])
                        ).status_code == 200
        assert len(rows(server)) == 5
        removed = store.enforce(NOW)
        # cutoff: midnight starting the day two days ago; earlier days go
        assert sorted(f.dst for f in rows(server)) == ["203.0.113.0", "203.0.113.1", "203.0.113.2"]
        if store.postgres:
            assert removed == 2
            days = set(store.partitions().values())
            assert _day(5).date() not in days and _day(3).date() not in days
            assert {_day(2).date(), _day(0).date(), _day(-1).date()} <= days
        else:
            assert removed == 2
        assert store.enforce(NOW) == 0
        # what the retention removed may not come back in
        r = post(server, batch([record(first=_day(3), last=_day(3))]))
        assert r.status_code == 200 and r.json()["expired"] == 0   # the server keeps 30 days
        late = FlowStore(engine, retention_days=2)
        from aus.server.flows import ingest
        assert ingest(late, "1", batch([record(first=_day(3), last=_day(3)), record()])) == \
            {"accepted": 1, "rows": 1, "expired": 1}
    finally:
        engine.dispose()


def test_retention_deletes_in_chunks_on_sqlite(tmp_path, monkeypatch):
    from aus.server import flowstore
    monkeypatch.setattr(flowstore, "DELETE_CHUNK", 7)
    engine, _ = open_database(f"sqlite:///{tmp_path}/aus-server.db")
    try:
        store = FlowStore(engine, retention_days=1)
        t = _day(4)
        store.write(merge_records("1", "w", [
            FlowRecord.model_validate(record(first=t, last=t, port=p)) for p in range(30)]))
        store.write(merge_records("1", "w", [FlowRecord.model_validate(record())]))
        assert store.enforce(NOW) == 30
        with engine.connect() as c:
            assert c.execute(select(Flow.port)).scalars().all() == [443]
    finally:
        engine.dispose()


def test_the_server_enforces_retention_periodically(db_url):
    from fastapi.testclient import TestClient

    from aus.server.app import create_app

    app = create_app(db_url, flow_retention_days=1, retention_interval=0.2)
    with TestClient(app):
        store: FlowStore = app.state.flows
        old = _day(3)
        store.write(merge_records("1", "w", [FlowRecord.model_validate(
            record(first=old, last=old))]))
        store.write(merge_records("1", "w", [FlowRecord.model_validate(record())]))

        def hours():
            with store.engine.connect() as c:
                return [utc(h) for h in c.execute(select(Flow.hour)).scalars()]
        wait_until(lambda: hours() == [HOUR], timeout=10)
        if store.postgres:
            today = NOW.date()
            assert {today, today + dt.timedelta(days=1)} <= set(store.partitions().values())


def test_postgres_flows_is_partitioned_by_day(postgres):
    from aus.server.flows import ingest

    name = postgres.new_database()
    engine, _ = open_database(postgres.url(name))
    try:
        with engine.connect() as c:
            kind = c.execute(text("SELECT relkind FROM pg_class WHERE relname = 'flows'")).scalar()
            strategy = c.execute(text(
                "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'flows'::regclass"
            )).scalar()
        assert (kind, strategy) == ("p", "r")
        store = FlowStore(engine)
        assert store.partitions() == {}
        # a day with no partition yet is made on demand
        assert ingest(store, "1", batch([record(first=_day(9), last=_day(9))]))["rows"] == 1
        assert store.partitions() == {f"flows_p{_day(9):%Y%m%d}": _day(9).date()}
        # a partition dropped behind this process's back is made again
        with engine.begin() as c:
            c.exec_driver_sql(f"DROP TABLE flows_p{_day(9):%Y%m%d}")
        assert ingest(store, "1", batch([record(first=_day(9), last=_day(9))]))["rows"] == 1
        with engine.connect() as c:
            assert [utc(h).date() for h in c.execute(select(Flow.hour)).scalars()] == \
                [_day(9).date()]

        # Rows written past the store, for a day without a partition, land
        # in the default partition; making the day's partition moves them.
        def direct(day: dt.datetime, dst: str) -> None:
            with Session(engine) as s, s.begin():
                s.add(Flow(org_id="1", hour=day.replace(minute=0), workload="w", login_uid=1,
                           user_name="u", groups=[], process="", dst=dst, proto="tcp", port=22,
                           verdict="allowed", rule="", first_seen=day, last_seen=day, count=1))

        def where(dst: str) -> str:
            with engine.connect() as c:
                return c.execute(text("SELECT tableoid::regclass::text FROM flows WHERE dst = :d"),
                                 {"d": dst}).scalar()
        direct(_day(12), "192.0.2.12")
        direct(_day(40), "192.0.2.40")
        assert where("192.0.2.12") == where("192.0.2.40") == "flows_default"
        store.ensure_partitions([_day(12).date()])
        assert where("192.0.2.12") == f"flows_p{_day(12):%Y%m%d}"
        assert ingest(store, "1", batch([record(first=_day(12), last=_day(12))]))["rows"] == 1
        # retention empties the default partition of days past it too
        store.enforce(NOW)
        assert where("192.0.2.40") is None and where("192.0.2.12") is not None
    finally:
        engine.dispose()
        postgres.drop_database(name)


def test_strings_the_database_cannot_hold_are_refused(server):
    # a lone surrogate (valid JSON escape, not storable text) and a NUL
    body = json.dumps(batch([record(), record(user="\ud800x")]))
    _refused(post(server, None, raw=body.encode(), gz=False), 400, "records[1].user", "surrogate")
    _refused(post(server, batch([record(process="cu\x00rl")])), 400, "records[0].process",
             "control character")
    deep = b'{"format": 1, "records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _refused(post(server, None, raw=deep, gz=False), 400, "nest")
    assert rows(server) == []


def test_a_real_server_process_takes_gzip_batches(tmp_path):
    """`aus-server serve --flow-retention-days` over real HTTP: the flag
    reaches the worker, whose retention removes the old day at start."""
    import urllib.request

    from aus.server.auth import create_key
    from tests.support.names import free_port
    from tests.support.server_process import serving, wait_port

    url = f"sqlite:///{tmp_path}/aus-server.db"
    engine, sessions = open_database(url)
    token = create_key(sessions, "1")
    store = FlowStore(engine)
    old = _day(5)
    store.write(merge_records("1", "w", [FlowRecord.model_validate(record(first=old, last=old))]))
    engine.dispose()
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", url, "--flow-retention-days", "2") as proc:
        wait_port(port, proc)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/orgs/1/flows", method="POST",
            data=gzip.compress(json.dumps(batch([record(), record(first=_day(4), last=_day(4))])
                                          ).encode()),
            headers={"Authorization": f"Bearer {token}", "Content-Encoding": "gzip",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read()) == {"accepted": 1, "rows": 1, "expired": 1}
        engine, _ = open_database(url)
        try:
            def hours():
                with engine.connect() as c:
                    return [utc(h) for h in c.execute(select(Flow.hour)).scalars()]
            wait_until(lambda: hours() == [HOUR], timeout=15, what="the old day removed")
        finally:
            engine.dispose()


def test_the_retention_flag_is_checked():
    import subprocess

    from tests.support.server_process import CLI

    p = subprocess.run(CLI + ["serve", "--flow-retention-days", "0"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "--flow-retention-days" in p.stderr and "1 to 3650" in p.stderr


def test_the_ingest_benchmark_runs_tiny():
    """bench.flow_ingest end to end in its tiny size, so it cannot rot
    (its figures mean something only in a full run)."""
    import subprocess
    import sys
    from pathlib import Path

    p = subprocess.run([sys.executable, "-m", "bench.flow_ingest", "--tiny"], capture_output=True,
                       text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "records/s" in p.stdout and "refused batches               0" in p.stdout


def test_the_agents_uploader_lands_records_in_a_real_server(tmp_path):
    """ausd's uploader (gzip, its credentials file) against a real
    aus-server process: the records arrive, merged, under the workload's name."""

    from aus.agent.flowupload import FlowUploader, flows_url
    from tests.support.names import free_port
    from tests.support.server_process import serving, wait_port

    url = f"sqlite:///{tmp_path}/aus-server.db"
    engine, sessions = open_database(url)
    creds = credentials_file(tmp_path / "credentials", sessions)
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", url) as proc:
        wait_port(port, proc)
        up = FlowUploader(flows_url(f"http://127.0.0.1:{port}/api/orgs/1/bundle"), creds, None,
                          spool_records=1000, spool_dir=None, spool_bytes=0)
        up.start()
        try:
            first = [FlowRecord.model_validate(record(count=2)),
                     FlowRecord.model_validate(record(dst="198.51.100.7", verdict="denied"))]
            up.submit(first, 0)
            wait_until(lambda: up.records_sent == 2, timeout=30, what="the first window sent")
            up.submit([FlowRecord.model_validate(record(count=5, process="wget",
                                                        last=HOUR + dt.timedelta(minutes=9)))], 0)
            wait_until(lambda: up.records_sent == 3, timeout=30, what="the second window sent")
            assert up.batches_refused == 0
        finally:
            up.stop()
    try:
        with sessions() as s:
            got = {f.dst: f for f in s.scalars(select(Flow))}
    finally:
        engine.dispose()
    assert set(got) == {"192.0.2.10", "198.51.100.7"}
    assert got["192.0.2.10"].count == 7 and got["192.0.2.10"].process == "wget"
    assert got["198.51.100.7"].verdict == "denied"
    assert {f.workload for f in got.values()} == {up.client.workload}
