"""What ausd's flow uploader makes of aus-server's refusals: the 400 body
{"error": {"status", "message", "fields": [...]}} of a malformed batch
read for its message and the fields it names, from the real server's
answer and against a real aus-server process."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select

from aus.agent.flowupload import FlowUploader, flows_url
from aus.agent.policysource import server_fields, server_reason
from aus.core.flowrecord import FlowRecord
from aus.server.db import Flow, Workload, open_database
from tests.support.flow_posts import HOUR, batch, credentials_file, post, record, stored
from tests.support.names import free_port
from tests.support.polling import wait_until
from tests.support.server_process import serving, wait_port

AHEAD = HOUR + dt.timedelta(days=2)


def test_the_servers_400_is_read_for_message_and_fields(server):
    bad = batch([record(port=p, proto="tcpx") for p in range(7)]
                + [record(first=AHEAD, last=AHEAD)])
    r = post(server, {**bad, "dropped": -1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["status"] == 400 and len(err["fields"]) == 8
    reason = server_reason(r.content)
    assert reason == " ".join(err["message"].split())[:200]
    assert reason.startswith("the flow batch is not valid: ")
    assert server_fields(r.content) == (
        "dropped, records[0].proto, records[1].proto, records[2].proto, records[3].proto "
        "(and 3 more)")
    assert stored(server.db_url) == []


def test_fields_in_other_shapes_and_none():
    assert server_fields(b'{"error": "bad", "fields": ["a.b", {"field": "c"}, 3]}') == "a.b, c"
    assert server_fields(b'{"error": {"message": "m", "fields": []}}') == ""
    assert server_fields(b"<html>502</html>") == ""
    assert server_fields(b'["not", "an", "object"]') == ""


def test_the_uploader_logs_a_real_refusal_with_its_fields(tmp_path, caplog):
    """A record more than a day ahead of the server's clock passes ausd's
    own model but not the server: the batch is dropped and counted, and
    the log and status say what the server said and which field."""
    url = f"sqlite:///{tmp_path}/aus-server.db"
    engine, sessions = open_database(url)
    creds = credentials_file(tmp_path / "credentials", sessions)
    engine.dispose()
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", url) as proc:
        wait_port(port, proc)
        up = FlowUploader(flows_url(f"http://127.0.0.1:{port}/api/orgs/1/bundle"), creds, None,
                          spool_records=1000, spool_dir=None, spool_bytes=0)
        up.start()
        try:
            with caplog.at_level(logging.ERROR, logger="aus.agent.flowupload"):
                up.submit([FlowRecord.model_validate(record()),
                           FlowRecord.model_validate(record(port=22, first=AHEAD, last=AHEAD))], 0)
                wait_until(lambda: up.batches_refused == 1, timeout=30, what="the refusal")
                # the next batch tells the server the two records it lost
                up.submit([FlowRecord.model_validate(record(port=80))], 0)
                wait_until(lambda: up.records_sent == 1 and up.spool.unreported == 0,
                           timeout=30, what="the next batch")
        finally:
            up.stop()
    want = ("HTTP 400: the flow batch is not valid: records[1].last_seen: is more than a day "
            "ahead of the server's clock [fields: records[1].last_seen]")
    assert up.status()["last_refusal"] == want
    assert up.status()["dropped"]["refused"] == 2
    assert "refused a batch of 2 records (" + want + ")" in caplog.text
    engine, sessions = open_database(url)
    try:
        with sessions() as s:
            assert [f.port for f in s.scalars(select(Flow))] == [80]
            assert [w.flows_dropped for w in s.scalars(select(Workload))] == [2]
    finally:
        engine.dispose()
