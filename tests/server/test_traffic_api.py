"""The traffic API (GET traffic, GET traffic/grouped) on SQLite and on
PostgreSQL, over flow rows written straight into the store: every filter,
CIDR matching for IPv4 and IPv6, key paging while rows arrive, the time
window, the grouped form, bad parameters, and org isolation."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.support.flow_seed import flow, insert

UTC = dt.timezone.utc


def now() -> dt.datetime:
    return dt.datetime.now(UTC).replace(microsecond=0)


def ago(**kw) -> dt.datetime:
    return now() - dt.timedelta(**kw)


def get(server, path: str = "/traffic", token: str | None = None, **params):
    return server.client.get(server.api + path, params=params, headers=server.bearer(token))


def items(server, path: str = "/traffic", **params) -> list[dict]:
    r = get(server, path, **params)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def all_pages(server, path: str = "/traffic", **params) -> list[dict]:
    out, cursor = [], None
    while True:
        r = get(server, path, **params, **({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        out += r.json()["items"]
        cursor = r.json()["next"]
        if cursor is None:
            return out


def dsts(rows: list[dict]) -> set[str]:
    return {r["dst"] for r in rows}


def test_items_carry_every_field_newest_first(server):
    t = ago(minutes=5)
    insert(server.db_url, [
        flow("1", user="alice", uid=1001, groups=["DEV", "OPS"], workload="web-1", process="curl",
             dst="192.0.2.10", proto="tcp", port=443, verdict="would_deny", rule="",
             last_seen=t, span=dt.timedelta(seconds=30), count=7),
        flow("1", user="bob", uid=1002, groups=[], dst="192.0.2.11", last_seen=t - dt.timedelta(minutes=1),
             verdict="allowed", rule="web"),
    ])
    got = items(server)
    assert got[0] == {
        "workload": "web-1", "user": "alice", "login_uid": 1001, "groups": ["DEV", "OPS"],
        "process": "curl", "dst": "192.0.2.10", "proto": "tcp", "port": 443, "verdict": "would_deny",
        "rule": "", "first_seen": (t - dt.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "last_seen": t.strftime("%Y-%m-%dT%H:%M:%SZ"), "count": 7}
    assert [r["user"] for r in got] == ["alice", "bob"]
    assert got[1]["groups"] == [] and got[1]["rule"] == "web"


def test_every_filter(server):
    t = ago(minutes=10)
    insert(server.db_url, [
        flow("1", user="alice", groups=["DEV"], workload="web-1", dst="10.0.0.1", proto="tcp", port=443,
             verdict="allowed", last_seen=t),
        flow("1", user="bob", groups=["OPS", "DEV"], workload="web-2", dst="10.0.0.2", proto="udp", port=53,
             verdict="denied", last_seen=t),
        flow("1", user="carol", groups=["OPS"], workload="web-2", dst="10.0.0.3", proto="tcp", port=22,
             verdict="would_deny", last_seen=t),
        flow("1", user="dan", groups=[], workload="db-1", dst="10.0.0.4", proto="icmp", port=0,
             verdict="allowed", last_seen=t),
    ])
    assert dsts(items(server, user="bob")) == {"10.0.0.2"}
    assert dsts(items(server, user="Bob")) == set()          # names are exact
    assert dsts(items(server, group="DEV")) == {"10.0.0.1", "10.0.0.2"}
    assert dsts(items(server, group="OPS")) == {"10.0.0.2", "10.0.0.3"}
    assert dsts(items(server, group="DE")) == set()          # a group, not a substring
    assert dsts(items(server, workload="web-2")) == {"10.0.0.2", "10.0.0.3"}
    assert dsts(items(server, port="22")) == {"10.0.0.3"}
    assert dsts(items(server, port="0")) == {"10.0.0.4"}
    assert dsts(items(server, proto="udp")) == {"10.0.0.2"}
    assert dsts(items(server, proto="ICMP")) == {"10.0.0.4"}
    assert dsts(items(server, verdict="denied")) == {"10.0.0.2"}
    assert dsts(items(server, verdict="denied,would_deny")) == {"10.0.0.2", "10.0.0.3"}
    # Filters combine with AND.
    assert dsts(items(server, group="OPS", proto="tcp", verdict="would_deny", workload="web-2")) == {"10.0.0.3"}
    assert dsts(items(server, group="OPS", port="443")) == set()


def test_dst_matches_addresses_and_cidrs_v4_and_v6(server):
    t = ago(minutes=3)
    addrs = ["10.1.2.3", "10.1.2.200", "10.1.3.1", "10.2.0.1", "192.0.2.1",
             "2001:db8:1:2::10", "2001:db8:1:2:ffff::1", "2001:db8:1:3::1", "2001:db9::1", "::1"]
    insert(server.db_url, [flow("1", dst=a, last_seen=t) for a in addrs])
    assert dsts(items(server, dst="10.1.2.3")) == {"10.1.2.3"}
    assert dsts(items(server, dst="10.1.2.0/24")) == {"10.1.2.3", "10.1.2.200"}
    assert dsts(items(server, dst="10.1.0.0/16")) == {"10.1.2.3", "10.1.2.200", "10.1.3.1"}
    assert dsts(items(server, dst="10.0.0.0/8")) == {"10.1.2.3", "10.1.2.200", "10.1.3.1", "10.2.0.1"}
    assert dsts(items(server, dst="10.1.2.3/32")) == {"10.1.2.3"}
    # Host bits set are taken as the network, as rules take them.
    assert dsts(items(server, dst="10.1.2.77/24")) == {"10.1.2.3", "10.1.2.200"}
    assert len(items(server, dst="0.0.0.0/0")) == 5
    assert dsts(items(server, dst="2001:db8:1:2::/64")) == {"2001:db8:1:2::10", "2001:db8:1:2:ffff::1"}
    assert dsts(items(server, dst="2001:db8::/32")) == {"2001:db8:1:2::10", "2001:db8:1:2:ffff::1",
                                                        "2001:db8:1:3::1"}
    # An address in another spelling is the same address.
    assert dsts(items(server, dst="2001:DB8:1:2:0:0:0:10")) == {"2001:db8:1:2::10"}
    assert dsts(items(server, dst="::1/128")) == {"::1"}
    assert len(items(server, dst="::/0")) == 5
    # IPv4 and IPv6 never match each other.
    assert dsts(items(server, dst="::ffff:0:0/96")) == set()


def test_paging_is_stable_while_rows_arrive(server):
    base = ago(hours=1)
    # Ties on last_seen: the id orders them.
    old = [flow("1", dst=f"10.9.0.{i}", last_seen=base - dt.timedelta(seconds=i // 3)) for i in range(40)]
    old_ids = set(insert(server.db_url, old))
    seen: list[dict] = []
    cursor, pages = None, 0
    while True:
        r = get(server, limit=7, **({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 7
        seen += page["items"]
        cursor, pages = page["next"], pages + 1
        if cursor is None:
            break
        # Newer traffic arrives between pages: it is ahead of the cursor,
        # so it shifts nothing.
        insert(server.db_url, [flow("1", dst=f"10.8.{pages}.{j}", last_seen=now()) for j in range(5)])
    assert pages == 6
    keys = [(r["dst"], r["last_seen"]) for r in seen]
    assert len(keys) == len(set(keys)), "a row came twice"
    assert {r["dst"] for r in seen} == {f"10.9.0.{i}" for i in range(40)}, "a row was skipped"
    assert len(old_ids) == 40
    # Newest first throughout.
    assert [r["last_seen"] for r in seen] == sorted((r["last_seen"] for r in seen), reverse=True)
    # A fresh listing shows the new rows first.
    first = items(server, limit=3)
    assert all(r["dst"].startswith("10.8.") for r in first)


def test_time_window(server):
    insert(server.db_url, [
        flow("1", dst="10.0.0.1", last_seen=ago(minutes=30)),
        flow("1", dst="10.0.0.2", last_seen=ago(hours=23)),
        flow("1", dst="10.0.0.3", last_seen=ago(hours=25)),
        flow("1", dst="10.0.0.4", last_seen=ago(days=10)),
        # Began before the window, went on into it.
        flow("1", dst="10.0.0.5", last_seen=ago(days=3), span=dt.timedelta(minutes=40)),
    ])
    # Without since: the last 24 hours.
    assert dsts(items(server)) == {"10.0.0.1", "10.0.0.2"}
    iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    assert dsts(items(server, since=iso(ago(days=30)))) == {f"10.0.0.{i}" for i in range(1, 6)}
    assert dsts(items(server, since=iso(ago(hours=26)), until=iso(ago(hours=22)))) == {"10.0.0.2", "10.0.0.3"}
    # Rows overlapping the window: last seen after since, first seen before until.
    three = ago(days=3)
    assert dsts(items(server, since=iso(three - dt.timedelta(minutes=20)),
                      until=iso(three - dt.timedelta(minutes=10)))) == {"10.0.0.5"}
    assert dsts(items(server, since=iso(three + dt.timedelta(minutes=1)),
                      until=iso(three + dt.timedelta(minutes=10)))) == set()
    # until alone: the 24 hours before it.
    assert dsts(items(server, until=iso(ago(hours=20)))) == {"10.0.0.2", "10.0.0.3"}
    # Other zones and fractions are understood.
    since = (ago(hours=24) + dt.timedelta(seconds=1)).astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert dsts(items(server, since=since.isoformat())) == {"10.0.0.1", "10.0.0.2"}


def test_grouped_form(server):
    t = ago(minutes=20)
    insert(server.db_url, [
        flow("1", user="alice", groups=["DEV", "OPS"], workload="w1", dst="10.0.0.1", port=443,
             verdict="would_deny", last_seen=t, count=5),
        flow("1", user="bob", groups=["DEV"], workload="w2", dst="10.0.0.1", port=443,
             verdict="denied", last_seen=t - dt.timedelta(minutes=5), count=2),
        flow("1", user="bob", groups=["DEV"], workload="w2", dst="10.0.0.1", port=443,
             verdict="allowed", last_seen=t - dt.timedelta(minutes=9), count=1),
        flow("1", user="carol", groups=["OPS"], workload="w1", dst="10.0.0.2", port=22,
             verdict="allowed", last_seen=t, count=3),
        flow("1", user="nobody", groups=[], workload="w3", dst="10.0.0.3", port=80, proto="udp",
             verdict="allowed", last_seen=t, count=4),
    ])
    r = get(server, "/traffic/grouped", by="group,dst,port")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["by"] == ["group", "dst", "port"] and body["next"] is None
    rows = {(i["group"], i["dst"], i["port"]): i for i in body["items"]}
    assert list(rows) == [("", "10.0.0.3", 80), ("DEV", "10.0.0.1", 443),
                          ("OPS", "10.0.0.1", 443), ("OPS", "10.0.0.2", 22)]
    dev = rows[("DEV", "10.0.0.1", 443)]
    assert dev["count"] == 8 and dev["rows"] == 3 and dev["users"] == 2 and dev["workloads"] == 2
    assert dev["verdicts"] == {"allowed": 1, "denied": 2, "would_deny": 5}
    first = (t - dt.timedelta(minutes=9, seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert dev["first_seen"] == first and dev["last_seen"] == t.strftime("%Y-%m-%dT%H:%M:%SZ")
    # A flow of a user in two groups counts under both.
    ops = rows[("OPS", "10.0.0.1", 443)]
    assert ops["count"] == 5 and ops["verdicts"]["would_deny"] == 5 and ops["users"] == 1
    # The default keys, and the same filters as the list.
    default = items(server, "/traffic/grouped")
    assert {(i["group"], i["dst"], i["port"], i["proto"]) for i in default} == {
        ("", "10.0.0.3", 80, "udp"), ("DEV", "10.0.0.1", 443, "tcp"), ("OPS", "10.0.0.1", 443, "tcp"),
        ("OPS", "10.0.0.2", 22, "tcp")}
    only_ops = items(server, "/traffic/grouped", group="OPS")
    assert {i["group"] for i in only_ops} == {"OPS"} and len(only_ops) == 2
    blocked = items(server, "/traffic/grouped", by="user", verdict="denied,would_deny")
    assert {i["user"]: i["count"] for i in blocked} == {"alice": 5, "bob": 2}
    per_dst = items(server, "/traffic/grouped", by="dst", dst="10.0.0.0/30")
    assert {i["dst"]: i["count"] for i in per_dst} == {"10.0.0.1": 8, "10.0.0.2": 3, "10.0.0.3": 4}
    # Paged by key: every group once, in order.
    paged = all_pages(server, "/traffic/grouped", by="group,dst,port", limit=1)
    assert [(i["group"], i["dst"], i["port"]) for i in paged] == list(rows)


def test_grouped_paging_while_rows_arrive(server):
    t = ago(minutes=20)
    insert(server.db_url, [flow("1", user=f"u{i}", groups=[f"G{i:02d}"], dst="10.0.0.1", last_seen=t)
                            for i in range(12)])
    seen, cursor = [], None
    while True:
        r = get(server, "/traffic/grouped", by="group", limit=5, **({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        seen += [i["group"] for i in r.json()["items"]]
        cursor = r.json()["next"]
        if cursor is None:
            break
        # A group that sorts before the cursor arrives: it shifts nothing.
        insert(server.db_url, [flow("1", groups=["A-new"], dst=f"10.0.1.{len(seen)}", last_seen=now())])
    assert seen == [f"G{i:02d}" for i in range(12)]


BAD = [
    ({"port": "70000"}, "port"), ({"port": "x"}, "port"), ({"port": "-1"}, "port"), ({"port": "\u00b2"}, "port"),
    ({"proto": "sctp"}, "proto"), ({"verdict": "blocked"}, "verdict"), ({"verdict": ","}, "verdict"),
    ({"dst": "10.0.0.300"}, "dst"), ({"dst": "10.0.0.0/33"}, "dst"), ({"dst": "example.com"}, "dst"),
    ({"since": "yesterday"}, "since"), ({"since": "2026-12-06T03:00:00"}, "since"),
    ({"until": "2026-13-01T00:00:00Z"}, "until"), ({"since": "0001-01-01T00:00:00+14:00"}, "since"),
    ({"until": "9999-12-31T23:59:59Z"}, "until"),
    ({"since": "2026-12-06T03:00:00Z", "until": "2026-12-06T02:00:00Z"}, "until"),
    ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "ten"}, "limit"),
    ({"limit": "\u0661"}, "limit"),
    ({"cursor": "not-a-cursor"}, "cursor"), ({"cursor": "W10"}, "cursor"),
    ({"user": "a" * 300}, "user"), ({"group": "x\ny"}, "group"),
    ({"usr": "alice"}, "usr"),
]


@pytest.mark.parametrize("params,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_parameter_is_named(server, params, name):
    for path in ("/traffic", "/traffic/grouped"):
        r = get(server, path, **params)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["status"] == 400 and f"'{name}'" in err["message"], err
        assert [f["field"] for f in err["fields"]] == [name]


def test_bad_grouping_and_repeated_and_foreign_cursors(server):
    insert(server.db_url, [flow("1", dst=f"10.0.0.{i}", last_seen=ago(minutes=i)) for i in range(5)])
    for by in ("colour", "group,group", ""):
        r = get(server, "/traffic/grouped", by=by)
        assert r.status_code == 400 and r.json()["error"]["fields"][0]["field"] == "by", r.text
    r = server.client.get(server.api + "/traffic?port=22&port=443", headers=server.bearer())
    assert r.status_code == 400 and "given more than once" in r.json()["error"]["message"]
    # A cursor continues only the query it came from.
    cursor = get(server, limit=2, port="443").json()["next"]
    assert cursor
    r = get(server, limit=2, port="22", cursor=cursor)
    assert r.status_code == 400 and r.json()["error"]["fields"][0]["field"] == "cursor"
    assert get(server, limit=2, port="443", cursor=cursor).status_code == 200
    grouped_cursor = get(server, "/traffic/grouped", by="dst", limit=2).json()["next"]
    r = get(server, cursor=grouped_cursor)
    assert r.status_code == 400 and r.json()["error"]["fields"][0]["field"] == "cursor"


def test_an_org_never_reads_another_orgs_flows(server):
    t = ago(minutes=1)
    insert(server.db_url, [
        flow("1", user="alice", groups=["DEV"], dst="10.0.0.1", last_seen=t),
        flow("2", user="mallory", groups=["DEV"], dst="10.0.0.66", last_seen=t),
        flow("2", user="alice", groups=["DEV"], dst="10.0.0.1", port=22, last_seen=t),
    ])
    mine = all_pages(server)
    assert [(r["user"], r["dst"], r["port"]) for r in mine] == [("alice", "10.0.0.1", 443)]
    assert items(server, user="mallory") == []
    assert items(server, dst="10.0.0.66") == []
    grouped = items(server, "/traffic/grouped", by="user,dst,port")
    assert [(i["user"], i["dst"], i["port"], i["count"]) for i in grouped] == [("alice", "10.0.0.1", 443, 1)]
    # Org 1's key cannot name org 2 in the path, nor the reverse.
    for path in ("/traffic", "/traffic/grouped"):
        r = server.client.get(f"/api/orgs/2{path}", headers=server.bearer())
        assert r.status_code == 403, r.text
        r = server.client.get(f"{server.api}{path}", headers=server.bearer(server.other_token))
        assert r.status_code == 403, r.text
        assert server.client.get(f"{server.api}{path}").status_code == 401
    # Org 2's key sees its own two rows only.
    theirs = server.client.get("/api/orgs/2/traffic", headers=server.bearer(server.other_token)).json()
    assert sorted(r["user"] for r in theirs["items"]) == ["alice", "mallory"]


def test_the_schema_has_the_models_indexes(server):
    """Migration 0005 and the Flow model name the same indexes."""
    from sqlalchemy import inspect

    from aus.server.db import Flow, open_database

    engine, _ = open_database(server.db_url)
    try:
        stored = {ix["name"] for ix in inspect(engine).get_indexes("flows")}
    finally:
        engine.dispose()
    modelled = {ix.name for ix in Flow.__table__.indexes}
    for name in ("ix_flows_org_last_seen", "ix_flows_org_user", "ix_flows_org_workload", "ix_flows_org_dst"):
        assert name in modelled and name in stored, (name, modelled, stored)
