"""The records a workload reported dropped (a flow batch's ``dropped``):
summed per workload in the same transaction as the batch's rows, shown in
GET /api/orgs/{org}/workloads, kept per org; on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

from aus.server.db import open_database
from tests.support.flow_posts import batch, post, record, stored
from tests.support.migrations import migrate, store_at
from tests.support.polling import wait_until


def dropped_batch(records: list[dict], dropped: int, workload: str = "web-1") -> dict:
    return batch(records, workload, dropped)


def workloads(server, token: str | None = None, org: str | None = None) -> dict[str, dict]:
    r = server.client.get(f"/api/orgs/{org or server.org}/workloads",
                          headers=server.bearer(token))
    assert r.status_code == 200, r.text
    return {w["name"]: w for w in r.json()["items"]}


def when(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def test_dropped_counts_are_summed_per_workload(server):
    t0 = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    assert post(server, dropped_batch([record()], 7)).status_code == 200
    # a count-only batch (no records left to send) still counts
    r = post(server, dropped_batch([], 5))
    assert r.status_code == 200 and r.json()["accepted"] == 0, r.text
    assert post(server, dropped_batch([record(port=22)], 0, "web-2")).status_code == 200
    got = workloads(server)
    assert got["web-1"]["flows_dropped"] == 12
    assert t0 <= when(got["web-1"]["flows_dropped_at"]) <= t0 + dt.timedelta(minutes=1)
    # a workload that never dropped anything reports 0 and no time, and a
    # batch without drops made no row for it
    assert "web-2" not in got
    assert len(stored(server.db_url)) == 2


def test_the_count_joins_the_workloads_check_in_row(server):
    """A workload that fetched its bundle: its row keeps version and
    address, and gains the count."""
    r = server.client.get(f"{server.api}/bundle", headers={**server.bearer(),
                                                           "X-Aus-Workload": "web-1"})
    assert r.status_code == 200, r.text
    wait_until(lambda: "web-1" in workloads(server), what="the check-in written")
    before = workloads(server)["web-1"]
    assert before["flows_dropped"] == 0 and before["flows_dropped_at"] is None
    assert post(server, dropped_batch([record()], 3)).status_code == 200
    after = workloads(server)["web-1"]
    assert after["flows_dropped"] == 3 and after["flows_dropped_at"] is not None
    assert after["enforcing_version"] == before["enforcing_version"]
    assert after["last_seen"] == before["last_seen"]


def test_a_refused_batch_counts_nothing(server):
    bad = dropped_batch([record(port="https")], 9)
    r = post(server, bad)
    assert r.status_code == 400, r.text
    assert "web-1" not in workloads(server)
    r = post(server, {**dropped_batch([], 0), "dropped": -1})
    assert r.status_code == 400 and r.json()["error"]["fields"][0]["field"] == "dropped", r.text
    assert workloads(server) == {}


def test_another_orgs_count_is_its_own(server):
    assert post(server, dropped_batch([], 4)).status_code == 200
    assert post(server, dropped_batch([], 6), token=server.other_token,
                org="2").status_code == 200
    assert workloads(server)["web-1"]["flows_dropped"] == 4
    assert workloads(server, server.other_token, "2")["web-1"]["flows_dropped"] == 6
    # org 2's key cannot add to org 1's count
    assert post(server, dropped_batch([], 100), token=server.other_token,
                org="1").status_code == 403
    assert workloads(server)["web-1"]["flows_dropped"] == 4


def test_a_huge_claim_is_held_below_the_columns_top(server):
    from aus.server.flowstore import DROPPED_MAX
    for _ in range(3):
        assert post(server, dropped_batch([], 1 << 53)).status_code == 200
    engine, sessions = open_database(server.db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE workloads SET flows_dropped = {DROPPED_MAX - 1}")
    finally:
        engine.dispose()
    r = post(server, dropped_batch([], 1 << 53))
    assert r.status_code == 200, r.text
    assert workloads(server)["web-1"]["flows_dropped"] == DROPPED_MAX


def test_the_upgrade_keeps_workloads_and_starts_them_at_zero(tmp_path):
    """0008 on a store at 0007: existing workloads get a count of 0 and no
    time; and back down."""
    url = f"sqlite:///{tmp_path}/old.db"
    engine = store_at(url, "0007")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO orgs (id, created_at, generation) VALUES ('1', '2026-01-01', 0)")
        conn.exec_driver_sql("INSERT INTO workloads (org_id, name, address, enforcing_version, last_seen)"
                             " VALUES ('1', 'web-1', '10.0.0.5', 3, '2026-01-01')")
    engine.dispose()
    engine, _ = open_database(url)     # upgrades to head
    try:
        with engine.connect() as conn:
            assert list(conn.exec_driver_sql(
                "SELECT name, flows_dropped, flows_dropped_at FROM workloads")) == [("web-1", 0, None)]
        migrate(engine, "0007", down=True)
        with engine.connect() as conn:
            cols = [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(workloads)")]
            names = [r[0] for r in conn.exec_driver_sql("SELECT name FROM workloads")]
        assert "flows_dropped" not in cols and names == ["web-1"]
    finally:
        engine.dispose()
