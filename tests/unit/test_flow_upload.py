"""The flow uploader against a stand-in flows endpoint on loopback
(tests/support/flow_receiver.py): the request, back-off on 5xx and
network errors, Retry-After, refused batches, submit never waiting."""

from __future__ import annotations

import logging
import time

import pytest

from aus.agent.flowupload import FlowUploader, flows_url, retry_after
from aus.agent.policysource import Backoff
from aus.core.errors import ConfigError
from aus.core.flowrecord import FlowRecord
from tests.support.flow_receiver import FLOWS_PATH, FlowReceiver
from tests.support.polling import wait_until

CREDS = ("flow-key", "flow-s3cret")


def rec(port: int) -> FlowRecord:
    return FlowRecord(login_uid=1000, user="alice", groups=["DEV"], process="curl",
                      dst="2001:db8::5", proto="tcp", port=port, verdict="would_deny",
                      rule="", first_seen="2026-12-06T03:00:01Z",
                      last_seen="2026-12-06T03:00:07Z", count=3)


@pytest.fixture
def creds(tmp_path):
    p = tmp_path / "credentials"
    p.touch(mode=0o600)
    p.write_text(":".join(CREDS) + "\n")
    return p


@pytest.fixture
def receiver():
    with FlowReceiver(credentials=CREDS) as r:
        yield r


def uploader(receiver, creds, tmp_path, **kw) -> FlowUploader:
    opts = dict(spool_records=1000, spool_dir=tmp_path / "spool", spool_bytes=1 << 20,
                backoff=Backoff(0.05, 0.4))
    ca = kw.pop("ca", None)
    opts.update(kw)
    return FlowUploader(flows_url(receiver.url), creds, ca, **opts)


def test_flows_url_and_retry_after():
    assert flows_url("https://srv/api/orgs/1/bundle") == "https://srv/api/orgs/1/flows"
    assert flows_url("http://127.0.0.1:8080/v1/orgs/7/bundle/?x=1") == \
        "http://127.0.0.1:8080/v1/orgs/7/flows"
    with pytest.raises(ConfigError, match="ending in /bundle"):
        flows_url("https://srv/api/orgs/1/policy")
    now = 1_800_000_000.0
    assert retry_after("7", now) == 7.0
    assert retry_after("100000", now) == 600.0
    assert retry_after(None, now) == 0.0 and retry_after("soon", now) == 0.0
    assert retry_after("Fri, 15 Jan 2027 08:00:05 GMT", 1_800_000_000.0 - 0) >= 0.0
    assert retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30)),
                       now) == pytest.approx(30, abs=1)


def test_backoff_grows_with_jitter_within_bounds():
    b = Backoff(1.0, 60.0, rand=lambda: 0.0)
    assert [b.next() for _ in range(8)] == [1.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    b = Backoff(1.0, 60.0, rand=lambda: 0.999999)
    assert [round(b.next()) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    b.reset()
    assert b.next() == pytest.approx(1.0)


def test_a_batch_goes_out_gzip_with_the_workload_credentials(receiver, creds, tmp_path):
    up = uploader(receiver, creds, tmp_path)
    up.start()
    try:
        up.submit([rec(p) for p in range(1, 11)], 4)
        wait_until(lambda: up.batches_sent == 1, what="the batch")
        post = receiver.posts[0]
        assert post.path == FLOWS_PATH and post.status == 200
        h = post.headers
        assert h["content-encoding"] == "gzip" and h["content-type"] == "application/json"
        assert h["x-aus-workload"] == up.client.workload and h["user-agent"].startswith("ausd/")
        assert post.batch["workload"] == up.client.workload and post.batch["dropped"] == 4
        assert [r["port"] for r in post.batch["records"]] == list(range(1, 11))
        assert post.batch["records"][0] == rec(1).wire()
        st = up.status()
        assert st["state"] == "ok" and st["records_sent"] == 10 and st["last_error"] is None
        assert st["dropped"] == {"window": 4, "spool": 0, "refused": 0, "corrupt": 0,
                                 "unreported": 0}
        assert st["spooled"]["memory"] == 0 and st["spooled"]["disk"] == 0
    finally:
        up.stop()


def test_server_errors_are_retried_with_backoff_records_kept(receiver, creds, tmp_path, caplog):
    receiver.answer = 503
    up = uploader(receiver, creds, tmp_path)
    up.start()
    try:
        with caplog.at_level(logging.WARNING, logger="aus.agent.flowupload"):
            up.submit([rec(p) for p in range(1, 6)], 0)
            wait_until(lambda: len(receiver.posts) >= 4, what="retries")
            st = up.status()
            assert st["state"] == "error" and "HTTP 503" in st["last_error"]
            assert st["failures"] >= 3 and st["spooled"]["memory"] == 5
            receiver.answer = 200
            wait_until(lambda: up.batches_sent == 1, what="the retry that works")
        # the pauses grew (exponential, jittered, capped at 0.4 s)
        times = [p.at for p in receiver.posts]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(g >= 0.02 for g in gaps)
        assert receiver.accepted() == [rec(p).wire() for p in range(1, 6)]
        assert caplog.text.count("HTTP 503") == 1          # logged once, not per retry
        assert up.status()["state"] == "ok" and up.status()["last_error"] is None
    finally:
        up.stop()


def test_network_errors_are_retried(creds, tmp_path):
    receiver = FlowReceiver(credentials=CREDS).start()
    receiver.stop()                       # the port is closed: connection refused
    up = uploader(receiver, creds, tmp_path)
    up.start()
    try:
        up.submit([rec(1)], 0)
        wait_until(lambda: up.backoff.failures >= 2, what="failures")
        assert "cannot reach" in up.status()["last_error"]
        receiver.start()
        wait_until(lambda: up.batches_sent == 1, timeout=10, what="the upload once it is up")
        assert [r["port"] for r in receiver.accepted()] == [1]
    finally:
        up.stop()
        receiver.stop()


def test_retry_after_is_honoured(receiver, creds, tmp_path):
    receiver.answer, receiver.retry_after = 429, "1"
    up = uploader(receiver, creds, tmp_path)
    up.start()
    try:
        up.submit([rec(1)], 0)
        wait_until(lambda: len(receiver.posts) == 1, what="the first try")
        receiver.answer = 200
        wait_until(lambda: up.batches_sent == 1, what="the retry")
        assert receiver.posts[1].at - receiver.posts[0].at >= 0.95
    finally:
        up.stop()


def test_refused_batches_are_dropped_counted_and_logged_once(receiver, creds, tmp_path,
                                                              caplog):
    receiver.answer = 400
    up = uploader(receiver, creds, tmp_path)
    up.start()
    try:
        with caplog.at_level(logging.ERROR, logger="aus.agent.flowupload"):
            up.submit([rec(p) for p in range(1, 4)], 0)
            wait_until(lambda: up.batches_refused >= 1, what="the refusal")
            up.submit([rec(p) for p in range(4, 6)], 0)
            wait_until(lambda: up.status()["dropped"]["refused"] == 5,
                       what="the second refusal")
        assert caplog.text.count("refused a batch") == 1
        assert "HTTP 400: forced 400" in caplog.text
        st = up.status()
        assert st["dropped"]["refused"] == 5 and st["last_refusal"] == "HTTP 400: forced 400"
        receiver.answer = 200
        up.submit([rec(9)], 0)
        wait_until(lambda: up.batches_sent >= 1 and up.spool.unreported == 0,
                   what="a batch telling the drop")
        assert receiver.dropped_told() == 5
        assert [r["port"] for r in receiver.accepted()] == [9]
    finally:
        up.stop()


def test_a_malformed_batch_is_refused_by_the_real_model(receiver, creds, tmp_path):
    """The receiver validates with the wire model: a good batch passes it."""
    up = uploader(receiver, creds, tmp_path)
    up.start()
    try:
        up.submit([rec(p) for p in range(1, 3)], 0)
        wait_until(lambda: up.batches_sent == 1, what="the batch")
        assert receiver.posts[0].status == 200 and up.batches_refused == 0
    finally:
        up.stop()


def test_submit_never_waits_for_a_hung_server(receiver, creds, tmp_path):
    receiver.answer = "hang"
    up = uploader(receiver, creds, tmp_path)
    up.start()
    try:
        up.submit([rec(1)], 0)
        wait_until(lambda: len(receiver.posts) == 1, what="the hung request")
        took = []
        for i in range(2000):
            t0 = time.perf_counter()
            up.submit([rec(2 + i % 60000)], 0)
            took.append(time.perf_counter() - t0)
        took.sort()
        # an append and an event: microseconds; the tail is the GIL and a
        # shared CPU, never the network (a hung request would be seconds)
        p50, p99 = took[len(took) // 2], took[len(took) * 99 // 100]
        assert p50 < 0.0005 and p99 < 0.05 and took[-1] < 1.0, (p50, p99, took[-1])
        wait_until(lambda: up.status()["spooled"]["queued"] == 0, what="the spool thread")
        assert up.status()["spooled"]["memory"] <= 1000
        assert up.status()["batches_sent"] == 0
    finally:
        t0 = time.monotonic()
        up.stop()
        took = time.monotonic() - t0
        receiver.release()
    assert took < 3.0, took
    # what could not be sent (the batch in flight too) is on disk for the next start
    # (a spool thread starved of CPU lets the hand-over queue overflow: what
    # it drops is counted, so every record is on disk or counted)
    assert up.spool.disk_records + up.spool.dropped_spool == 2001
    assert up.spool.disk_records >= 1000


def test_bad_credentials_are_retried_and_read_again(receiver, creds, tmp_path):
    creds.write_text("flow-key:wrong\n")
    up = uploader(receiver, creds, tmp_path)
    up.start()
    try:
        up.submit([rec(1)], 0)
        wait_until(lambda: len(receiver.posts) >= 1 and up.backoff.failures >= 1,
                   what="a 401")
        assert "refused the credentials (HTTP 401)" in up.status()["last_error"]
        creds.write_text(":".join(CREDS) + "\n")      # the key is fixed on disk
        wait_until(lambda: up.batches_sent == 1, what="the upload with the new key")
    finally:
        up.stop()


def test_a_stalled_spool_thread_does_not_let_the_queue_grow(receiver, creds, tmp_path):
    up = uploader(receiver, creds, tmp_path, spool_dir=None)
    for p in range(1, 3001):                  # no threads yet: nobody takes them
        up.submit([rec(p)], 1 if p <= 10 else 0)
    assert up.queued() == 1000 and len(up._inbox) == 1000
    up.start()
    try:
        wait_until(lambda: up.spool.unreported == 0 and up.status()["spooled"]["memory"] == 0
                   and up.batches_sent >= 1, what="the upload")
        assert [r["port"] for r in receiver.accepted()] == list(range(2001, 3001))
        # 2000 records lost in the queue, and the 10 window drops they carried
        assert receiver.dropped_told() == 2010
        st = up.status()["dropped"]
        assert st["spool"] == 2000 and st["window"] == 10
    finally:
        up.stop()


def test_https_with_policy_ca_and_an_untrusted_server(creds, tmp_path):
    import ssl

    from tests.support.bundle_server import self_signed
    cert, key = self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with FlowReceiver(credentials=CREDS, tls=ctx) as srv:
        assert srv.url.startswith("https://")
        trusted = uploader(srv, creds, tmp_path, ca=cert)
        untrusted = uploader(srv, creds, tmp_path, spool_dir=None)
        trusted.start()
        untrusted.start()
        try:
            trusted.submit([rec(1)], 0)
            untrusted.submit([rec(2)], 0)
            wait_until(lambda: trusted.batches_sent == 1 and untrusted.backoff.failures >= 1,
                       what="one upload over TLS, one refused certificate")
            assert "certificate is not trusted" in untrusted.status()["last_error"]
            assert [r["port"] for r in srv.accepted()] == [1]
        finally:
            trusted.stop()
            untrusted.stop()


def test_status_lines_of_ausctl(receiver, creds, tmp_path):
    from aus.cli.ausctl import _upload_lines
    receiver.answer = 503
    up = uploader(receiver, creds, tmp_path, backoff=Backoff(5.0, 10.0))
    up.start()
    try:
        up.submit([rec(p) for p in range(1, 4)], 2)
        wait_until(lambda: up.backoff.failures >= 1 and up.next_retry, what="a failure")
        text = "\n".join(_upload_lines(up.status()))
    finally:
        up.stop()
    assert f"upload:    error to {receiver.url.replace('bundle', 'flows')}" in text
    assert "0 batches (0 records) sent; spooled 3 in memory (of 1000; 0 queued)" in text
    assert "dropped: 0 spool full, 0 refused, 0 corrupt files, 2 window cap; " \
           "2 not yet reported" in text
    assert "last error: the policy server failed (HTTP 503" in text and "next retry in" in text
