"""Flow records on the agent: the aggregator (keys, merge, verdicts, the
window cap and its overflow count, window close), the flows filters and
request fields, and the local export (journal datagrams, rotated JSON
lines)."""

from __future__ import annotations

import json
import socket

import pytest

from aus.agent import flowlog
from aus.agent.commands import RequestError, parse
from aus.agent.config import ConfigError, config_from_text
from aus.agent.flowrecords import Aggregator, Filter, key_of, policy_groups
from aus.core.flowrecord import FlowBatch
from tests.support.polling import wait_until


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def who(uid):
    return {1000: ("alice", ("DEV",)), 1001: ("bob", ())}.get(uid, ("", ()))


def ev(uid=1000, dst="192.0.2.10", proto="tcp", dport=443, verdict="allow",
       rule="web", t=1_765_000_000.0, comm="curl"):
    return {"time": t, "login_uid": uid, "uid": uid, "pid": 1, "comm": comm,
            "hook": "connect4", "verdict": verdict, "reason": "rule", "rule_id": 2,
            "rule": rule, "family": 4, "proto": proto, "src": "10.0.0.1", "sport": 40000,
            "dst": dst, "dport": dport, "bytes": 0}


def agg(cap=100, window=10.0):
    clock = Clock()
    return Aggregator(window, cap, who, clock), clock


def test_events_of_one_key_merge_into_one_record():
    a, _ = agg()
    a.add(ev(t=100.0, comm="curl"))
    a.add(ev(t=105.0, comm="wget"))
    a.add(ev(t=102.0, comm="late"))     # out of order: not the latest
    records, dropped = a.close()
    assert dropped == 0 and len(records) == 1
    r = records[0]
    assert (r.login_uid, r.user, r.groups, r.dst, r.proto, r.port, r.verdict, r.rule) == \
        (1000, "alice", ["DEV"], "192.0.2.10", "tcp", 443, "allowed", "web")
    assert r.count == 3 and r.process == "wget"
    assert r.first_seen.timestamp() == 100.0 and r.last_seen.timestamp() == 105.0


def test_every_key_field_separates_records():
    a, _ = agg()
    base = ev()
    for change in ({}, {"uid": 1001}, {"dst": "192.0.2.11"}, {"proto": "udp"},
                   {"dport": 80}, {"verdict": "deny"}, {"rule": None}):
        a.add({**base, **change, "login_uid": change.get("uid", 1000)})
    records, _ = a.close()
    assert len(records) == 7
    assert {r.user for r in records} == {"alice", "bob"}
    # built without validation: the wire model accepts every one, unchanged
    batch = FlowBatch.model_validate({"format": 1, "workload": "w",
                                      "records": [r.wire() for r in records]})
    assert [r.wire() for r in batch.records] == [r.wire() for r in records]


@pytest.mark.parametrize("kernel, record", [
    ("allow", "allowed"), ("deny", "denied"), ("audit", "would_deny")])
def test_verdicts_map_to_the_wire_names(kernel, record):
    a, _ = agg()
    a.add(ev(verdict=kernel, rule=None if kernel != "allow" else "web"))
    (r,), _ = a.close()
    assert r.verdict == record
    assert r.rule == ("web" if kernel == "allow" else "")


def test_ports_only_for_tcp_and_udp_and_other_protocols_named_other():
    assert key_of(ev(proto="icmp", dport=8))[2:4] == ("icmp", 0)
    assert key_of(ev(proto="47", dport=5))[2:4] == ("other", 0)
    assert key_of(ev(proto="udp", dport=53))[2:4] == ("udp", 53)
    assert key_of(ev(uid=4294967295)) is None


def test_cap_bounds_the_window_and_counts_distinct_dropped_records():
    a, _ = agg(cap=3)
    for port in range(1, 4):
        a.add(ev(dport=port))
    for _ in range(5):                   # known keys still merge when full
        a.add(ev(dport=1))
    for port in (10, 11, 10, 12, 11):    # three new keys, five events
        a.add(ev(dport=port))
    assert len(a.records) == 3
    records, dropped = a.close()
    assert len(records) == 3 and dropped == 3
    assert {r.port: r.count for r in records} == {1: 6, 2: 1, 3: 1}
    st = a.status()
    assert st["dropped"] == 3 and st["records_open"] == 0 and st["windows_closed"] == 1
    # the next window starts empty, with room again
    a.add(ev(dport=10))
    records, dropped = a.close()
    assert [r.port for r in records] == [10] and dropped == 0
    assert a.status()["dropped"] == 3 and a.status()["records_closed"] == 4


def test_overflow_memory_is_bounded_too():
    a, _ = agg(cap=2)
    for port in range(1, 10_000):
        a.add(ev(dport=port))
    assert len(a.records) == 2 and len(a._overflow) <= 2
    _, dropped = a.close()
    # exact for as many distinct keys as the cap, one per event past it
    assert dropped == 10_000 - 1 - 2


def test_window_closes_by_the_clock_and_restarts_from_the_close():
    a, clock = agg(window=10.0)
    assert a.timeout() == 10.0 and a.step() is None
    clock.now += 9.5
    assert a.timeout() == pytest.approx(0.5) and a.step() is None
    a.add(ev())
    clock.now += 3.0                      # closed late
    records, dropped = a.step()
    assert len(records) == 1 and dropped == 0
    assert a.timeout() == 10.0 and a.records == {} and a.step() is None
    clock.now += 10.0
    assert a.step() == ([], 0)            # an empty window closes empty
    assert a.status()["windows_closed"] == 2 and a.status()["records_closed"] == 1


def test_a_full_window_closes_a_slice_per_step_while_the_next_fills():
    a, clock = agg(cap=2500)
    for port in range(2500):
        a.add(ev(dport=port, t=100.0))
    clock.now += 10.0
    assert a.step(budget=1000) is None    # 1000 built
    assert a.timeout() == 0.0             # more to do: the loop must not wait
    a.add(ev(dport=1, t=111.0))           # the next window already takes events
    assert a.step(budget=1000) is None
    records, dropped = a.step(budget=1000)
    assert len(records) == 2500 and dropped == 0
    assert {r.port for r in records} == set(range(2500))
    assert all(r.count == 1 and r.last_seen.timestamp() == 100.0 for r in records)
    assert a.status()["windows_closed"] == 1 and a.timeout() == 10.0
    (r,), _ = a.close()                   # close now, whole (at exit)
    assert (r.port, r.first_seen.timestamp()) == (1, 111.0)


def test_records_are_valid_batch_members_even_with_hostile_names():
    a, _ = agg()
    a.add(ev(comm="ev\nil\x01name" + "x" * 80))
    records, _ = a.close()
    batch = FlowBatch.model_validate({"format": 1, "workload": "w", "dropped": 0,
                                      "records": [r.wire() for r in records]})
    assert batch.records[0].process.startswith("ev?il?name")
    assert len(batch.records[0].process) <= 64


def test_policy_groups_match_like_rule_sources():
    declared = [("DEV", None), ("ops", None), ("Admins", "S-1-5-21-1-2-3-512"), ("x@corp", None)]
    assert policy_groups(declared, ["dev@corp.example", "users"]) == ("DEV",)
    assert policy_groups(declared, ["OPS"], ["s-1-5-21-1-2-3-512"]) == ("ops", "Admins")
    assert policy_groups(declared, ["x"]) == ()
    assert policy_groups(declared, ["X@CORP"]) == ("x@corp",)


# ---- filters and request fields ------------------------------------------

def test_filters_select_events_and_records():
    e = {**ev(dst="::ffff:192.0.2.10"), "user": "alice"}
    assert Filter().event(e)
    assert Filter.of({"user": "alice", "verdict": "allowed", "to": "192.0.2.0/24",
                      "port": 443, "since": int(e["time"])}).event(e)
    assert not Filter(user="bob").event(e)
    assert not Filter.of({"verdict": "would_deny"}).event(e)
    assert not Filter.of({"to": "198.51.100.0/24"}).event(e)
    assert not Filter.of({"to": "2001:db8::/32"}).event(e)
    assert not Filter(port=80).event(e)
    assert not Filter(since=e["time"] + 1).event(e)
    a, _ = agg()
    a.add(ev(verdict="audit", rule=None))
    (r,), _ = a.close()
    assert Filter.of({"verdict": "would_deny", "user": "alice", "to": "192.0.2.10"}).record(r)
    assert not Filter.of({"verdict": "denied"}).record(r)
    assert not Filter.of({"since": int(r.last_seen.timestamp()) + 1}).record(r)


def test_flows_request_fields_are_validated():
    args = parse(b'{"cmd":"flows","user":"alice","verdict":"would_deny","to":"10.0.0.0/8",'
                 b'"port":22,"since":1765000000,"records":true}').args
    assert args == {"limit": 100, "follow": False, "user": "alice", "verdict": "would_deny",
                    "to": "10.0.0.0/8", "port": 22, "since": 1765000000, "records": True}
    for line, says in [
        (b'{"cmd":"flows","verdict":"deny"}', "must be one of allowed, denied, would_deny"),
        (b'{"cmd":"flows","to":"10.0.0.0/33"}', "field 'to': '10.0.0.0/33' is not an address"),
        (b'{"cmd":"flows","to":"x"}', "is not an address or CIDR"),
        (b'{"cmd":"flows","port":65536}', "field 'port' must be 0..65535"),
        (b'{"cmd":"flows","port":"22"}', "field 'port' must be an integer"),
        (b'{"cmd":"flows","since":-1}', "field 'since' must be 0.."),
        (b'{"cmd":"flows","user":' + b'"' + b"a" * 300 + b'"}', "longer than 256"),
        (b'{"cmd":"flows","records":1}', "field 'records' must be true or false"),
    ]:
        with pytest.raises(RequestError) as exc:
            parse(line)
        assert says in str(exc.value), (line, str(exc.value))


# ---- configuration ----------------------------------------------------------

def test_flow_config_defaults_and_forms():
    cfg = config_from_text("")
    assert (cfg.flow_window, cfg.flow_window_records, cfg.flow_log) == (10.0, 10000, None)
    assert config_from_text("flow_log: off").flow_log is None
    assert str(config_from_text("flow_log: journal").flow_log.journal) == \
        "/run/systemd/journal/socket"
    f = config_from_text("flow_log:\n  path: /var/log/aus/f.jsonl\n  max_bytes: 65536\n"
                         "  keep: 2\n").flow_log
    assert (str(f.path), f.max_bytes, f.keep, f.journal) == ("/var/log/aus/f.jsonl", 65536, 2, None)


@pytest.mark.parametrize("text, says", [
    ("flow_window: 0.5", "line 1: flow_window: must be between 1 and 3600 seconds"),
    ("flow_window_records: 0", "line 1: flow_window_records: must be between 1 and"),
    ("flow_window_records: '5'", "line 1: flow_window_records:"),
    ("flow_log: yes", "line 1: flow_log: expected off, journal, or a mapping"),
    ("flow_log: syslog", "line 1: flow_log: expected off, journal"),
    ("flow_log:\n  path: rel.jsonl", "line 2: flow_log.path: must be an absolute path"),
    ("flow_log:\n  keep: 2", "line 1: flow_log: give either path"),
    ("flow_log:\n  path: /a\n  max_bytes: 10", "line 3: flow_log.max_bytes: must be between 4096"),
    ("flow_log:\n  path: /a\n  size: 10", "line 3: flow_log.size: unknown key"),
])
def test_flow_config_errors_name_file_line_and_key(text, says):
    with pytest.raises(ConfigError) as exc:
        config_from_text(text, "/etc/aus/ausd.yaml")
    assert "/etc/aus/ausd.yaml" in str(exc.value) and says in str(exc.value)


# ---- export -------------------------------------------------------------------

def closed(n=1, **kw):
    a, _ = agg(cap=10_000)
    for i in range(n):
        a.add(ev(dport=1 + i, **kw))
    return a.close()[0]


def parse_journal(data: bytes) -> dict:
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            size = int.from_bytes(data[nl + 1:nl + 9], "little")
            out[line.decode()] = data[nl + 9:nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return out


def test_journal_sink_sends_one_native_entry_per_record(tmp_path):
    path = tmp_path / "journal.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    sink = flowlog.JournalSink(path)
    try:
        sink(closed(2, verdict="deny", rule=None), 0)
        sink.flush()
        entries = [parse_journal(rx.recv(65536)) for _ in range(2)]
        assert {e["AUS_PORT"] for e in entries} == {"1", "2"}
        e = entries[0]
        assert (e["AUS_USER"], e["AUS_LOGIN_UID"], e["AUS_DST"], e["AUS_PROTO"],
                e["AUS_VERDICT"], e["AUS_RULE"], e["PRIORITY"]) == \
            ("alice", "1000", "192.0.2.10", "tcp", "denied", "", "4")
        assert e["MESSAGE"].startswith("denied alice -> 192.0.2.10:")
        assert sink.status()["sent"] == 2 and sink.status()["failures"] == 0
    finally:
        rx.close()
        sink.close()


def test_journal_sink_never_waits_and_counts_failures_once_logged(tmp_path, caplog):
    path = tmp_path / "journal.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rx.bind(str(path))
    sink = flowlog.JournalSink(path)
    try:
        sink(closed(3000), 0)              # nobody reads: the socket fills
        sink.flush()
        st = sink.status()
        assert st["sent"] < 3000 and st["sent"] + st["failures"] == 3000
        assert len([r for r in caplog.records if "flow log" in r.getMessage()]) == 1
        rx.close()
        path.unlink()
        sink(closed(5), 0)                 # no journal at all
        sink.flush()
        assert sink.status()["failures"] == st["failures"] + 5
        assert len([r for r in caplog.records if "flow log" in r.getMessage()]) == 1
    finally:
        sink.close()


def test_file_sink_rotates_by_size_and_keeps_n(tmp_path):
    path = tmp_path / "log" / "flows.jsonl"
    one = len(json.dumps(closed(1)[0].wire(), sort_keys=True)) + 1
    sink = flowlog.FileSink(path, max_bytes=one * 10, keep=2)
    for _ in range(5):
        sink(closed(7), 0)                 # 35 records, 10 per file
        sink.flush()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"]
    for p in path.parent.iterdir():
        assert p.stat().st_size <= one * 10
        for line in p.read_text().splitlines():
            assert json.loads(line)["user"] == "alice"
    assert len(path.read_text().splitlines()) == 5
    assert sink.status()["written"] == 35 and sink.status()["rotations"] == 3


def test_file_sink_failure_is_counted(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    sink = flowlog.FileSink(blocker / "flows.jsonl", max_bytes=4096, keep=1)
    sink(closed(4), 0)
    sink.flush()
    assert sink.status()["failures"] == 4 and sink.status()["last_error"]
    sink.close()


def test_export_queue_is_bounded_and_the_caller_never_waits(tmp_path, monkeypatch):
    import threading
    import time

    sink = flowlog.FileSink(tmp_path / "flows.jsonl", max_bytes=1 << 20, keep=1)
    gate = threading.Event()
    write = sink.write
    monkeypatch.setattr(sink, "write", lambda records: (gate.wait(10), write(records)))
    t0 = time.monotonic()
    sink(closed(10), 0)                   # taken by the thread, which waits
    wait_until(lambda: sink._queue.qsize() == 0, what="the export thread took a window")
    for _ in range(flowlog.QUEUED + 2):   # QUEUED queued, two refused
        sink(closed(10), 0)
    assert time.monotonic() - t0 < 1.0
    assert sink.status()["failures"] == 20
    gate.set()
    sink.flush()
    assert sink.status()["written"] == 10 * (flowlog.QUEUED + 1)
    sink.close()


def test_ausctl_since_takes_durations_and_iso_times():
    import argparse

    from aus.cli.ausctl import parser, since
    now = 1_765_000_000.0
    assert since("10m", now) == now - 600 and since("1h", now) == now - 3600
    assert since("30s", now) == now - 30 and since("2d", now) == now - 172800
    assert since("2026-12-06T03:00:00Z") == 1796526000
    assert since("2026-12-06T04:00:00+01:00") == 1796526000
    for bad in ("10x", "yesterday", "", "-5m"):
        with pytest.raises(argparse.ArgumentTypeError):
            since(bad, now)
    args = parser().parse_args(["flows", "--records", "--user", "alice", "--verdict",
                                "would_deny", "--to", "192.0.2.7/24", "--port", "443"])
    assert (args.records, args.user, args.verdict, args.to, args.port) == \
        (True, "alice", "would_deny", "192.0.2.0/24", 443)
    with pytest.raises(SystemExit):
        parser().parse_args(["flows", "--verdict", "deny"])
