"""The control command table: every request a local user can send is
either a validated Request or a RequestError that says what is wrong;
nothing else escapes, and a failing handler costs one error reply."""

from __future__ import annotations

import json
import logging

import pytest

from aus.agent import commands
from aus.agent.commands import COMMANDS, MAX_REQUEST, RequestError, parse, run
from aus.core.errors import PolicyError


def req(obj) -> bytes:
    return json.dumps(obj).encode()


def test_valid_requests_get_every_field_with_defaults():
    r = parse(b'{"cmd":"flows"}')
    unfiltered = {"user": None, "verdict": None, "to": None, "port": None, "since": None,
                  "records": False}
    assert (r.cmd, r.args) == ("flows", {"limit": 100, "follow": False, **unfiltered})
    r = parse(b'{"cmd":"flows","limit":0,"follow":true}')
    assert r.args == {"limit": 0, "follow": True, **unfiltered}
    assert parse(b'{"cmd":"flows","limit":10000}').args["limit"] == 10000
    assert parse(b'{"cmd":"rules"}').args == {"login_uid": None}
    assert parse(b'{"cmd":"rules","login_uid":0}').args == {"login_uid": 0}
    assert parse(b'{"cmd":"rules","login_uid":4294967294}').args == {"login_uid": 4294967294}
    assert parse(b'  {"cmd": "status"}  ').cmd == "status"
    assert parse(b'{"cmd":"session_open"}').spec.root_only
    assert not parse(b'{"cmd":"users"}').spec.root_only


@pytest.mark.parametrize("line, says", [
    # the findings: non-finite and non-integer numbers, arrays for ints
    (b'{"cmd":"flows","limit":Infinity}', "Infinity is not a JSON number"),
    (b'{"cmd":"flows","limit":-Infinity}', "-Infinity is not a JSON number"),
    (b'{"cmd":"flows","limit":NaN}', "NaN is not a JSON number"),
    (b'{"cmd":"flows","limit":1e999}', "out of range"),
    (b'{"cmd":"flows","limit":1.5}', "'limit' must be an integer, not number 1.5"),
    (b'{"cmd":"flows","limit":100.0}', "must be an integer"),
    (b'{"cmd":"rules","login_uid":[]}', "'login_uid' must be an integer, not array []"),
    (b'{"cmd":"rules","login_uid":{}}', "must be an integer, not object"),
    (b'{"cmd":"rules","login_uid":"1000"}', "must be an integer, not string"),
    (b'{"cmd":"rules","login_uid":null}', "must be an integer, not null"),
    (b'{"cmd":"rules","login_uid":true}', "must be an integer, not boolean true"),
    (b'{"cmd":"flows","follow":1}', "'follow' must be true or false, not integer 1"),
    (b'{"cmd":"flows","follow":"yes"}', "must be true or false"),
    # ranges
    (b'{"cmd":"flows","limit":-1}', "'limit' must be 0..10000, not -1"),
    (b'{"cmd":"flows","limit":10001}', "must be 0..10000"),
    (b'{"cmd":"rules","login_uid":-1}', "must be 0..4294967294"),
    (b'{"cmd":"rules","login_uid":4294967295}', "must be 0..4294967294"),
    (b'{"cmd":"flows","limit":' + b"9" * 21 + b"}", "an integer of 21 digits is out of range"),
    (b'{"cmd":"flows","limit":' + b"9" * 5000 + b"}", "out of range"),
    (b'{"cmd":"flows","limit":18446744073709551616}', "must be 0..10000"),
    # the shape of a request
    (b"[]", 'a JSON object with a "cmd" string, not array'),
    (b'"status"', "not string"),
    (b"null", "not null"),
    (b"7", "not integer"),
    (b"{}", 'a JSON object with a "cmd" string'),
    (b'{"cmd":7}', '"cmd" string'),
    (b'{"cmd":["status"]}', '"cmd" string'),
    (b'{"cmd":"shutdown"}', "unknown command 'shutdown'"),
    (b'{"cmd":"' + b"x" * 5000 + b'"}', "unknown command"),
    (b'{"cmd":"status","verbose":true}', "status: unknown field 'verbose' (it takes none)"),
    (b'{"cmd":"flows","limt":5}', "flows: unknown field 'limt' (known: limit, follow, user, verdict, to, port, "
     "since, records)"),
    (b'{"cmd":"status","x":[[[[]]]]}', "unknown field 'x'"),
    # bytes that are not JSON, or not text
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b'{"cmd":"status"} trailing', "not JSON: Extra data"),
    (b'{"cmd":"st\xffatus"}', "not UTF-8 (byte 10)"),
    (b"\xff\xfe{\x00", "not UTF-8"),
    (b'{"cmd":"status\\ud800"}', "unknown command"),
])
def test_hostile_requests_get_a_clear_error(line, says):
    with pytest.raises(RequestError) as exc:
        parse(line)
    assert says in str(exc.value)


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_nesting_is_refused_not_a_crash(depth):
    for line in (b"[" * depth, b'{"cmd":"status","x":' + b"[" * depth + b"]" * depth + b"}",
                 b'{"a":' * depth + b"1" + b"}" * depth):
        with pytest.raises(RequestError) as exc:
            parse(line[:MAX_REQUEST])
        assert "bad request" in str(exc.value) or "unknown field" in str(exc.value) \
            or '"cmd" string' in str(exc.value)


def test_oversize_request_is_refused_before_parsing():
    line = req({"cmd": "status", "pad": "x" * MAX_REQUEST})
    with pytest.raises(RequestError, match=f"larger than {MAX_REQUEST} bytes"):
        parse(line)


def test_every_command_of_the_table_parses_bare():
    for name in COMMANDS:
        assert parse(req({"cmd": name})).cmd == name


def test_run_turns_any_exception_into_one_error_reply(caplog):
    def boom():
        raise OverflowError("cannot convert float infinity to integer")
    with caplog.at_level(logging.ERROR, logger=commands.log.name):
        reply = run(boom, "flows")
    assert reply == {"ok": False, "error": "flows: internal error (OverflowError); see ausd's log"}
    assert "flows failed" in caplog.text and "OverflowError" in caplog.text

    def refused():
        raise PolicyError("policy.yaml", ["rule x: bad"])
    assert run(refused, "reload")["error"].startswith("policy.yaml: policy refused")
    assert run(lambda: None, "users") == {"ok": False, "error": "users: internal error; see ausd's log"}
    assert run(lambda: {"ok": True}, "users") == {"ok": True}


def test_explain_takes_an_address_or_a_dns_name():
    base = {"cmd": "explain", "user": "alice", "proto": "tcp", "port": 443}
    assert parse(req({**base, "to": "10.0.0.1"})).args["to"] == "10.0.0.1"
    assert parse(req({**base, "to": "GitHub.com"})).args["to"] == "GitHub.com"
    assert parse(req({**base, "to": "dns:objects.githubusercontent.com"})).args["to"]
    long_name = ".".join(["a" * 63] * 3 + ["b" * 61])         # 253 characters
    assert parse(req({**base, "to": long_name})).args["to"] == long_name
    for bad, says in (("a..b", "'to': 'a..b' is neither an address nor a DNS name"),
                      ("*.github.com", "'to': '*.github.com' is a pattern"),
                      ("x" * 301, "'to' is longer than 300 characters")):
        with pytest.raises(RequestError) as exc:
            parse(req({**base, "to": bad}))
        assert says in str(exc.value)
