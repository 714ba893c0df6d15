"""ausd's policy server client against a real HTTP(S) server on loopback
(tests/support/bundle_server.py): credentials, the retry schedule, the
long-poll protocol, the poller thread, and the daemon's handling of what it
delivers (start from the cache, fail closed, refusals, memberships,
deltas and the fallback to the full bundle when one does not apply)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import threading
import time

import pytest

from aus.agent.ausd import Daemon
from aus.agent.bundlecache import read_cache, write_cache
from aus.agent.config import DaemonConfig
from aus.agent.identity import Directory
from aus.agent.policysource import (
    Backoff,
    Client,
    Fetched,
    Poller,
    Refused,
    read_credentials,
)
from aus.cli import ausctl
from aus.core.bundle import (
    MAX_BUNDLE_BYTES,
    bundle_from_bytes,
    bundle_from_data,
    diff_documents,
)
from aus.core.errors import ConfigError, PolicyError, PolicySourceError
from aus.core.policy import empty_policy
from aus.core.state import plan
from tests.support.bundle_server import BundleServer, bundle, self_signed

CREDS = ("key1", "s3cret")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    with BundleServer(credentials=CREDS) as srv:
        yield srv


def client(srv: BundleServer, creds=CREDS, **kw) -> Client:
    return Client(srv.url, creds, workload="ws-17", **kw)


def wait_for(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------
# Credentials


def cred_file(tmp_path, text: str, mode: int = 0o600):
    path = tmp_path / "credentials"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_credentials_read(tmp_path):
    assert read_credentials(cred_file(tmp_path, "key1:s3:cret\n")) == ("key1", "s3:cret")
    assert read_credentials(cred_file(tmp_path, "\n  key1:s3cret  \n\n", 0o400)) == (
        "key1", "s3cret")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_credentials_readable_by_others_are_refused(tmp_path, mode):
    path = cred_file(tmp_path, "key1:s3cret\n", mode)
    with pytest.raises(ConfigError) as info:
        read_credentials(path)
    assert str(info.value) == (
        f"policy_credentials {path}: readable by its group or by others (mode {mode:04o}); "
        f"the secret must be readable by its owner only: chmod 600 {path}")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o622])
def test_credentials_writable_by_others_are_refused(tmp_path, mode):
    path = cred_file(tmp_path, "key1:s3cret\n", mode)
    with pytest.raises(ConfigError) as info:
        read_credentials(path)
    assert str(info.value) == (f"policy_credentials {path}: writable by its group or by others "
                               f"(mode {mode:04o}): chmod 600 {path}")


def test_credentials_owned_by_another_user_are_refused(tmp_path):
    path = cred_file(tmp_path, "key1:s3cret\n", 0o600)
    os.chown(path, 4242, 0)    # the suite runs as root: a file of uid 4242
    with pytest.raises(ConfigError) as info:
        read_credentials(path)
    assert str(info.value) == (f"policy_credentials {path}: owned by uid 4242, not root; "
                               f"chown root:root {path}")
    os.chown(path, 0, 4242)    # a group that is not root's is fine at mode 0600
    assert read_credentials(path) == ("key1", "s3cret")


@pytest.mark.parametrize("text, reason", [
    ("", "expected one line <api_key>:<secret>, found 0 lines"),
    ("key1:s3cret\nkey2:other\n", "expected one line <api_key>:<secret>, found 2 lines"),
    ("key1s3cret\n", "expected one line <api_key>:<secret> with both parts non-empty"),
    (":s3cret\n", "expected one line <api_key>:<secret> with both parts non-empty"),
    ("key1:\n", "expected one line <api_key>:<secret> with both parts non-empty"),
])
def test_credentials_format(tmp_path, text, reason):
    path = cred_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_credentials(path)
    assert str(info.value) == f"policy_credentials {path}: {reason}"


def test_credentials_missing_or_not_a_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot open: No such file or directory"):
        read_credentials(tmp_path / "nope")
    link = tmp_path / "link"
    link.symlink_to(cred_file(tmp_path, "key1:s3cret\n"))
    with pytest.raises(ConfigError, match="cannot open"):
        read_credentials(link)          # a symlink could point anywhere
    with pytest.raises(ConfigError, match="not a regular file"):
        read_credentials(tmp_path)


# --------------------------------------------------------------------------
# Backoff


def test_backoff_doubles_to_the_cap_with_jitter():
    top = Backoff(rand=lambda: 1.0)
    assert [top.next() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    bottom = Backoff(rand=lambda: 0.0)
    assert [bottom.next() for _ in range(8)] == [1, 1, 2, 4, 8, 16, 30, 30]
    bottom.reset()
    assert bottom.next() == 1 and bottom.failures == 1


def test_backoff_jitter_stays_in_range():
    b = Backoff()
    for n in range(40):
        base = min(60, 2 ** n)
        delay = b.next()
        assert max(1, base / 2) <= delay <= base


# --------------------------------------------------------------------------
# One request


def test_first_fetch_sends_the_protocol_headers(server):
    etag = server.publish(bundle(42, {"DEV": ["alice"]}))
    c = client(server)
    reply = c.fetch(None, 0, 30)
    assert reply.status == 200 and reply.etag == etag
    assert bundle_from_data(json.loads(reply.body), "x").version == 42
    seen = server.requests[-1]
    assert seen.path == "/v1/orgs/1/bundle" and seen.wait == 30
    h = seen.headers
    assert h["authorization"] == "Basic a2V5MTpzM2NyZXQ="        # key1:s3cret
    assert h["x-aus-workload"] == "ws-17"
    assert h["x-aus-enforcing"] == "0"
    assert h["accept"] == "application/json, application/vnd.aus.bundle-delta+json"
    assert h["accept-encoding"] == "gzip" and seen.since is None
    assert "if-none-match" not in h
    c.close()


def test_304_when_nothing_changes_within_the_wait(server):
    etag = server.publish(bundle(1, {}))
    c = client(server)
    t0 = time.monotonic()
    reply = c.fetch(etag, 1, 1)
    assert reply.status == 304 and reply.etag == etag
    assert 0.9 <= time.monotonic() - t0 < 5
    h = server.requests[-1].headers
    assert h["if-none-match"] == etag and h["x-aus-enforcing"] == "1"
    # the same connection serves the next poll
    assert c.fetch(etag, 1, 1).status == 304
    c.close()


def test_change_during_the_wait_is_delivered_promptly(server):
    etag = server.publish(bundle(1, {}))
    c = client(server)
    threading.Timer(0.3, server.publish, [bundle(2, {"DEV": ["alice"]})]).start()
    t0 = time.monotonic()
    reply = c.fetch(etag, 1, 20)
    took = time.monotonic() - t0
    assert reply.status == 200 and reply.etag != etag
    assert b'"version": 2' in reply.body
    assert 0.25 <= took < 2.0, took     # the change, not the 20 s wait, ended it
    c.close()


@pytest.mark.parametrize("status, kind, text", [
    (401, "auth", "the policy server refused the credentials (HTTP 401): check the API key "
     "and secret in policy_credentials: bad API key or secret"),
    (403, "forbidden", "the policy server refused access (HTTP 403): the API key does not "
     "belong to the organisation in the URL: forced 403"),
    (404, "not_found", "the policy server does not know this URL (HTTP 404): check the "
     "organisation in the policy URL: forced 404"),
    (500, "server", "the policy server failed (HTTP 500 Internal Server Error): forced 500"),
    (503, "server", "the policy server failed (HTTP 503 Service Unavailable): forced 503"),
    (418, "protocol", "unexpected reply from the policy server (HTTP 418 I'm a Teapot): "
     "forced 418"),
])
def test_error_statuses(server, status, kind, text):
    server.publish(bundle(1, {}))
    if status == 401:
        c = client(server, creds=("key1", "wrong"))
    else:
        server.fail = status
        c = client(server)
    with pytest.raises(PolicySourceError) as info:
        c.fetch(None, 0, 30)
    assert (info.value.kind, info.value.status, str(info.value)) == (kind, status, text)


def test_error_detail_in_the_servers_shape(server):
    # aus-server's error body: {"error": {"status", "message", "fields"}}
    server._answer = lambda h, path, wait: (
        404, b'{"error": {"status": 404, "message": "org \'1\' has no policy bundle yet", '
             b'"fields": []}}', None)
    with pytest.raises(PolicySourceError) as info:
        client(server).fetch(None, 0, 1)
    assert str(info.value).endswith("check the organisation in the policy URL: "
                                    "org '1' has no policy bundle yet")


def test_server_down_is_a_network_error():
    port = free_port()
    c = Client(f"http://127.0.0.1:{port}/v1/orgs/1/bundle", CREDS)
    with pytest.raises(PolicySourceError) as info:
        c.fetch(None, 0, 30)
    assert info.value.kind == "network"
    assert str(info.value) == f"cannot reach 127.0.0.1:{port}: Connection refused"


def test_a_200_without_etag_is_refused(server):
    with server._cond:
        server._body, server._etag = b"{}", ""    # served, but with no ETag header
    with pytest.raises(PolicySourceError) as info:
        client(server).fetch(None, 0, 1)
    assert info.value.kind == "protocol" and "has no ETag header" in str(info.value)


# --------------------------------------------------------------------------
# HTTPS


@pytest.fixture
def tls_server(tmp_path):
    cert, key = self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with BundleServer(credentials=CREDS, tls=ctx) as srv:
        yield srv, cert


def test_https_with_policy_ca(tls_server):
    srv, cert = tls_server
    assert srv.url.startswith("https://127.0.0.1:")
    etag = srv.publish(bundle(9, {"DEV": ["alice"]}))
    c = client(srv, ca=cert)
    reply = c.fetch(None, 0, 5)
    assert reply.status == 200 and reply.etag == etag
    assert c.fetch(etag, 9, 1).status == 304
    c.close()


def test_https_without_the_ca_is_not_trusted(tls_server):
    srv, _ = tls_server
    srv.publish(bundle(9, {}))
    with pytest.raises(PolicySourceError) as info:
        client(srv).fetch(None, 0, 5)        # system CAs only
    assert info.value.kind == "tls"
    assert "the server's certificate is not trusted" in str(info.value)
    assert srv.requests == []                 # nothing was sent, credentials included


def test_bad_policy_ca_is_a_config_error(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=f"policy_ca {bad}: cannot load the CA certificates"):
        Client("https://127.0.0.1:1/b", CREDS, ca=bad)


# --------------------------------------------------------------------------
# The poller thread


class Inbox(list):
    """Collects deliveries and acknowledges them as the main loop does:
    a bundle is then in force, a refusal changes nothing."""
    poller: Poller | None = None

    def __call__(self, item):
        self.append(item)
        if self.poller is not None:
            self.poller.acknowledge(item.bundle.version if isinstance(item, Fetched)
                                    else self.poller.enforcing)


def fast_poller(srv_url: str, inbox, **kw) -> Poller:
    p = Poller(Client(srv_url, CREDS, workload="ws-17"), inbox,
               backoff=Backoff(lo=0.05, hi=0.2), **kw)
    inbox.poller = p
    return p


def test_poller_delivers_bundles_and_long_polls(server):
    server.publish(bundle(1, {}))
    inbox = Inbox()
    p = fast_poller(server.url, inbox, wait=20)
    p.start()
    try:
        wait_for(lambda: len(inbox) == 1, what="the first bundle")
        assert isinstance(inbox[0], Fetched) and inbox[0].bundle.version == 1
        wait_for(lambda: len(server.requests) == 2, what="the long poll")
        assert server.requests[0].headers["x-aus-enforcing"] == "0"
        h = server.requests[1].headers
        assert h["if-none-match"] == inbox[0].etag and h["x-aus-enforcing"] == "1"
        t0 = time.monotonic()
        server.publish(bundle(2, {"DEV": ["bob"]}))
        wait_for(lambda: len(inbox) == 2, timeout=2, what="the new bundle")
        assert time.monotonic() - t0 < 1.0
        assert inbox[1].bundle.groups_of("bob") == ("DEV",)
        st = p.status()
        assert st["state"] == "ok" and st["etag"] == inbox[1].etag and st["last_error"] is None
        wait_for(lambda: len(server.requests) == 3)
        assert server.requests[2].headers["x-aus-enforcing"] == "2"
    finally:
        p.stop()


def test_the_next_poll_waits_for_the_delivery_to_be_handled(server):
    server.publish(bundle(1, {}))
    got = []
    p = Poller(Client(server.url, CREDS), got.append, wait=20)
    p.start()
    try:
        wait_for(lambda: got, what="the bundle")
        time.sleep(0.3)
        assert len(server.requests) == 1        # not acknowledged yet: no new poll
        p.acknowledge(1)
        wait_for(lambda: len(server.requests) == 2, what="the next poll")
        assert server.requests[1].headers["x-aus-enforcing"] == "1"
    finally:
        p.stop()


def test_kick_ends_the_long_poll_at_once(server):
    etag = server.publish(bundle(1, {}))
    inbox = Inbox()
    p = fast_poller(server.url, inbox, wait=30, etag=etag, enforcing=1)
    p.start()
    try:
        wait_for(lambda: len(server.requests) == 1, what="the long poll")
        time.sleep(0.2)
        t0 = time.monotonic()
        p.kick()
        wait_for(lambda: len(server.requests) >= 2 and server.requests[1].status == 304,
                 timeout=2, what="the immediate re-fetch")
        assert time.monotonic() - t0 < 1.0
        assert server.requests[1].wait == 0       # no wait: answered at once
        wait_for(lambda: len(server.requests) == 3, what="the long poll again")
        assert server.requests[2].wait == 30
        assert p.status()["state"] == "ok" and inbox == []
    finally:
        p.stop()
    assert not p._thread.is_alive()


def test_server_down_then_up(caplog):
    port = free_port()
    srv = BundleServer(credentials=CREDS, port=port)
    inbox = Inbox()
    p = fast_poller(srv.url, inbox, wait=5)
    caplog.set_level(logging.DEBUG, logger="aus.agent.policysource")
    p.start()
    try:
        wait_for(lambda: p.status()["failures"] >= 4, what="several retries")
        st = p.status()
        assert st["state"] == "error"
        assert st["last_error"] == f"cannot reach 127.0.0.1:{port}: Connection refused"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]   # once, not per retry
        srv.publish(bundle(3, {}))
        srv.start()
        wait_for(lambda: inbox, what="the bundle once the server is up")
        assert inbox[0].bundle.version == 3
        st = p.status()
        assert st["state"] == "ok" and st["last_error"] is None and st["failures"] == 0
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        # and the server going away mid-poll is noticed and retried
        srv.stop()
        wait_for(lambda: p.status()["state"] == "error", what="the error")
        srv.start()
        srv.publish(bundle(4, {}))
        wait_for(lambda: len(inbox) == 2, what="the next bundle")
    finally:
        p.stop()
        srv.stop()


def test_bad_credentials_are_retried_and_surface(server):
    server.publish(bundle(1, {}))
    inbox = Inbox()
    p = Poller(Client(server.url, ("key1", "nope")), inbox, backoff=Backoff(lo=0.05, hi=0.1))
    p.start()
    try:
        wait_for(lambda: p.status()["failures"] >= 2)
        assert "HTTP 401" in p.status()["last_error"] and inbox == []
    finally:
        p.stop()


def test_bad_bundle_is_refused_and_not_fetched_again(server):
    good = server.publish(bundle(1, {}))
    inbox = Inbox()
    p = fast_poller(server.url, inbox, wait=1)
    p.start()
    try:
        wait_for(lambda: len(inbox) == 1)
        doc = bundle(2, {"DEV": ["alice"]})
        doc["policy"]["rules"][0]["sources"] = ["QA"]
        bad = server.publish(doc)
        wait_for(lambda: len(inbox) == 2)
        refused = inbox[1]
        assert isinstance(refused, Refused) and refused.etag == bad != good
        assert str(refused.error) == (
            f"bundle from {server.url} (ETag {bad}): policy refused:\n"
            "  policy.rules[0].sources[0]: 'QA' is not a declared user group")
        # the next poll waits for a change past the bad bundle
        n = len(server.requests)
        wait_for(lambda: len(server.requests) > n + 1)
        assert server.requests[n].headers["if-none-match"] == bad
        assert len(inbox) == 2
    finally:
        p.stop()


# --------------------------------------------------------------------------
# The daemon's side: start, apply, refuse, memberships (maps planned, not written)


USERS = {2001: ("alice", ("staff",)), 2002: ("bob", ("dev",)), 2003: ("carol", ())}


def nss(uid):
    name, groups = USERS.get(uid, (None, ()))
    return name, groups


def daemon(tmp_path, url, **cfg) -> Daemon:
    creds = cred_file(tmp_path, "key1:s3cret\n")
    config = DaemonConfig(policy=url, policy_credentials=creds,
                          policy_cache=tmp_path / "state" / "bundle.json",
                          pin_dir=tmp_path / "pins", socket=tmp_path / "ausd.sock", **cfg)
    d = Daemon(config)
    d.directory = Directory(ttl=3600, lookup=nss)

    def sync(why, changed=None):
        p, d.kstate = plan(d.kstate, d.desired(), changed)
        d.syncs.append(why)
    d.syncs = []
    d.sync = sync
    return d


def start_policy(d: Daemon):
    """What Daemon.start does with a URL, minus the kernel."""
    b, first, refusals = d.follower.start()
    for item in refusals:
        d._refused(item)
    d.policy = b.policy if b else empty_policy()
    d.bundle = b
    d.compiled = d._compile(d.policy, b.version if b else 0)
    d.rebuild_want()
    d.sync("start")
    d.follower.enforcing(b)
    if first is not None:
        d._bundle_in_force(first)
    return b, first


def rules_of(d, uid):
    info, extra = d.groups_of(uid)
    return sorted(d.compiled.rule_names[r] for r in d.rules_of(info, extra))


def test_start_uses_the_cache_when_the_server_is_down(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1/orgs/1/bundle"
    d = daemon(tmp_path, url)
    cached = bundle_from_data(bundle(7, {"DEV": ["alice"]}), "x")
    write_cache(d.cfg.policy_cache, url, '"b7"', cached, fetched_at=100.0)
    d.sessions.open(2001)
    t0 = time.monotonic()
    b, first = start_policy(d)
    assert time.monotonic() - t0 < 0.5        # no wait for the server
    assert b.version == 7 and first is None
    assert d.compiled.version == 7 and d.follower.poller.enforcing == 7
    assert d.follower.poller._etag == '"b7"'
    assert d.follower.from_cache is True
    assert rules_of(d, 2001) == ["dev-web"]
    assert d.follower.poller.status()["state"] == "starting"


def test_start_without_cache_fetches_once(tmp_path, server):
    etag = server.publish(bundle(3, {"OPS": ["Alice"]}))
    d = daemon(tmp_path, server.url)
    d.sessions.open(2001)
    b, first = start_policy(d)
    assert b.version == 3 and first.etag == etag
    assert server.requests[0].wait == 0
    assert rules_of(d, 2001) == ["ops-ssh"]
    assert d.follower.from_cache is False
    # the bundle in force was written as the last good one
    assert read_cache(d.cfg.policy_cache, server.url).bundle.version == 3


def test_start_without_cache_and_server_fails_closed(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1/orgs/1/bundle"
    d = daemon(tmp_path, url)
    d.sessions.open(2002)
    t0 = time.monotonic()
    b, first = start_policy(d)
    assert time.monotonic() - t0 < 5
    assert b is None and first is None
    assert d.compiled.version == 0 and d.compiled.rules == ()
    assert rules_of(d, 2002) == []            # baseline only
    assert d.follower.poller.status()["state"] == "error"
    assert "Connection refused" in d.follower.poller.status()["last_error"]


def test_corrupt_cache_is_ignored_with_a_reason(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1/orgs/1/bundle"
    d = daemon(tmp_path, url)
    d.cfg.policy_cache.parent.mkdir()
    d.cfg.policy_cache.write_text("{")
    b, _ = start_policy(d)
    assert b is None and "not a bundle cache" in d.follower.cache_error


def test_new_bundle_changes_logged_in_users_and_bad_one_is_refused(tmp_path, server):
    server.publish(bundle(1, {"DEV": ["alice", "bob"]}))
    d = daemon(tmp_path, server.url)
    for uid in USERS:
        d.sessions.open(uid)
    start_policy(d)
    assert rules_of(d, 2001) == ["dev-web"] and rules_of(d, 2002) == ["dev-web"]
    alice_before = d.kstate.users[2001].ruleset
    gen = d.kstate.config.users_gen

    # alice leaves DEV, carol joins OPS: one delivery, everyone recomputed
    v2 = bundle_from_data(bundle(2, {"DEV": ["bob"], "OPS": ["carol"]}), "x")
    d.apply_fetched(Fetched(v2, '"b2"', 200.0))
    assert d.syncs[-1] == "bundle" and d.policy_error is None
    assert d.compiled.version == 2 and d.kstate.config.policy_version == 2
    assert rules_of(d, 2001) == [] and rules_of(d, 2003) == ["ops-ssh"]
    assert d.kstate.users[2001].ruleset != alice_before
    assert d.kstate.config.users_gen > gen
    assert d.follower.poller.enforcing == 2
    assert read_cache(d.cfg.policy_cache, server.url).etag == '"b2"'

    # a refused bundle leaves everything as it was
    doc = bundle(3, {"DEV": ["alice"]})
    doc["policy"]["rules"][0]["services"] = ["80/tcpp"]
    with pytest.raises(PolicyError) as info:
        bundle_from_bytes(json.dumps(doc).encode(), "bundle v3")
    syncs = len(d.syncs)
    d.apply_fetched(Refused(info.value, '"b3"', 300.0))
    assert "80/tcpp" in d.policy_error and len(d.syncs) == syncs
    assert d.compiled.version == 2 and rules_of(d, 2001) == []
    assert read_cache(d.cfg.policy_cache, server.url).bundle.version == 2

    # the next good one clears the error
    d.apply_fetched(Fetched(bundle_from_data(bundle(4, {"DEV": ["alice"]}), "x"), '"b4"', 400.0))
    assert d.policy_error is None and rules_of(d, 2001) == ["dev-web"]


def test_nss_and_bundle_groups_add_up(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1/orgs/1/bundle"
    d = daemon(tmp_path, url, bundle_user_match="local-part")
    write_cache(d.cfg.policy_cache, url, '"b1"', bundle_from_data(
        bundle(1, {"DEV": ["carol@contoso.com"]}), "x"))
    start_policy(d)
    # bob: NSS group 'dev' matches policy group DEV by name; carol: the bundle
    info, extra = d.groups_of(2002)
    assert (info.groups, extra) == (("dev",), ()) and rules_of(d, 2002) == ["dev-web"]
    info, extra = d.groups_of(2003)
    assert (info.groups, extra) == ((), ("DEV",)) and rules_of(d, 2003) == ["dev-web"]
    (tmp_path / "exact").mkdir()
    d2 = daemon(tmp_path / "exact", url)
    write_cache(d2.cfg.policy_cache, url, '"b1"', bundle_from_data(
        bundle(1, {"DEV": ["carol@contoso.com"]}), "x"))
    start_policy(d2)
    assert rules_of(d2, 2003) == []


def test_reload_with_a_url_refetches_and_rereads_credentials(tmp_path, server):
    etag = server.publish(bundle(1, {}))
    d = daemon(tmp_path, server.url)
    start_policy(d)
    reply = d.reload()
    assert reply == {"ok": True, "refetch": True, "url": server.url, "version": 1, "rules": 2}
    assert d.follower.poller._kick.is_set()
    d.follower.poller.poll_once()
    assert server.requests[-1].wait == 0 and server.requests[-1].headers["if-none-match"] == etag
    d.cfg.policy_credentials.chmod(0o644)
    reply = d.reload()
    assert reply["ok"] is False and "chmod 600" in reply["error"]


def test_status_shows_the_source_of_the_policy(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1/orgs/1/bundle"
    d = daemon(tmp_path, url)
    write_cache(d.cfg.policy_cache, url, '"b7"', bundle_from_data(bundle(7, {}), "x"),
                fetched_at=time.time() - 60)
    start_policy(d)
    d.follower.poller.poll_once()                     # the server is down
    srv = d.follower.status()
    assert srv["url"] == url and srv["bundle_version"] == 7 and srv["org"] == "1"
    assert srv["etag"] == '"b7"' and srv["from_cache"] is True
    assert srv["cache"] == str(d.cfg.policy_cache) and srv["cache_error"] is None
    assert srv["state"] == "error" and srv["failures"] == 1 and srv["last_fetch"] is None
    assert "Connection refused" in srv["last_error"]
    lines = ausctl._server_lines(srv)
    assert lines[0].strip().startswith('bundle version 7 of org 1 (generated '
                                       '2026-11-28T15:00:00Z), ETag "b7", from the cache ')
    assert re.search(r"\(fetched \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(6[0-2] s ago\)\)$",
                     lines[0])
    assert lines[1].strip() == "server: error, last answer never"
    assert lines[2].strip().startswith("last error: cannot reach 127.0.0.1:")
    assert lines[2].endswith("(1 failures in a row)")


def test_status_without_a_bundle_says_fail_closed(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1/orgs/1/bundle"
    d = daemon(tmp_path, url)
    start_policy(d)
    srv = d.follower.status()
    assert srv["bundle_version"] is None and srv["from_cache"] is False
    assert ausctl._server_lines(srv)[0].strip() == \
        "no bundle yet: enforcing the baseline only (fail closed)"


# --------------------------------------------------------------------------
# Deltas and gzip


def test_a_gzip_reply_is_inflated(server):
    server.gzip = True
    doc = bundle(5, {"DEV": [f"user{i}" for i in range(500)]})
    etag = server.publish(doc)
    reply = client(server).fetch(None, 0, 0)
    assert reply.etag == etag and json.loads(reply.body) == doc
    assert reply.wire_bytes < len(reply.body) / 3


def test_a_decompression_bomb_is_refused(server):
    import gzip
    server.gzip = True
    server.gzip_body = gzip.compress(b" " * (MAX_BUNDLE_BYTES + 1024), 9)
    server.publish(bundle(5, {}))
    assert len(server.gzip_body) < 100_000
    with pytest.raises(PolicySourceError) as info:
        client(server).fetch(None, 0, 0)
    assert info.value.kind == "protocol"
    assert f"the gzip reply inflates to more than {MAX_BUNDLE_BYTES} bytes; refused" \
        in str(info.value)


def poll_in_thread(d: Daemon):
    """One poll of the daemon's poller (its own thread, as in ausd), the
    deliveries applied here as the main loop applies them."""
    t = threading.Thread(target=d.follower.poller.poll_once)
    t.start()
    while t.is_alive() or d._inbox:
        if d._inbox:
            d.apply_fetched(d._inbox.popleft())
        time.sleep(0.01)
    t.join()


def test_a_delta_is_applied_and_a_bad_one_falls_back_to_the_full_bundle(tmp_path, server,
                                                                      caplog):
    server.gzip = True
    v1 = bundle(1, {"DEV": ["alice", "bob"], "OPS": []})
    server.publish(v1)
    d = daemon(tmp_path, server.url)
    for uid in USERS:
        d.sessions.open(uid)
    start_policy(d)
    assert rules_of(d, 2001) == ["dev-web"] and d.follower.status()["last_update"]["kind"] \
        == "full"

    # A delta 1 -> 2 that does not make version 2 (alice stays in DEV):
    # refused for its digest, the whole bundle fetched at once.
    v2 = bundle(2, {"DEV": ["bob"], "OPS": ["carol"]})
    bad = diff_documents(v1, v2)
    bad["members"]["remove"] = {}
    server.publish(v2, deltas={1: bad})
    with caplog.at_level(logging.ERROR, logger="aus.agent.policysource"):
        d.follower.poller.poll_once()
    assert server.requests[-1].since == 1 and server.requests[-1].delta
    assert d.compiled.version == 1 and rules_of(d, 2001) == ["dev-web"]   # still in force
    st = d.follower.status()
    assert st["delta_refusals"] == 1 and "digest: the bundle the delta makes hashes to" \
        in st["last_delta_refused"]
    assert any("refused, fetching the whole bundle" in r.getMessage() for r in caplog.records)
    poll_in_thread(d)                      # the kick: the full fetch, at once
    full = server.requests[-1]
    assert full.since is None and "if-none-match" not in full.headers and not full.delta
    assert full.wait == 0
    assert d.compiled.version == 2 and rules_of(d, 2001) == [] and rules_of(d, 2003) == \
        ["ops-ssh"]
    assert d.follower.status()["last_update"]["kind"] == "full"

    # A good delta 2 -> 3 is applied; the cache holds the whole bundle 3.
    v3 = bundle(3, {"DEV": ["alice", "bob"], "OPS": ["carol"]})
    server.publish(v3, deltas={2: diff_documents(v2, v3)})
    poll_in_thread(d)
    assert server.requests[-1].since == 2 and server.requests[-1].delta
    assert d.compiled.version == 3 and rules_of(d, 2001) == ["dev-web"]
    up = d.follower.status()["last_update"]
    assert (up["kind"], up["from_version"], up["version"]) == ("delta", 2, 3)
    assert 0 < up["wire_bytes"] < len(json.dumps(v3))
    assert read_cache(d.cfg.policy_cache, server.url).bundle.data == v3
    lines = ausctl._server_lines(d.follower.status())
    assert f"last update: a delta from version 2 to version 3, {up['wire_bytes']} bytes on " \
        "the wire" in "\n".join(lines)

    # A delta from a version ausd does not hold is refused the same way.
    v4 = bundle(4, {"DEV": ["bob"], "OPS": ["carol"]})
    server.publish(v4, deltas={3: diff_documents(v2, v4)})
    d.follower.poller.poll_once()
    assert d.compiled.version == 3
    assert "from_version: the delta starts from version 2, the bundle in force is version 3" \
        in d.follower.status()["last_delta_refused"]
    poll_in_thread(d)
    assert d.compiled.version == 4 and rules_of(d, 2001) == []

    # A restart enforces the cached bundle: the whole of version 4.
    d.follower.stop()
    again = daemon(tmp_path, server.url)
    b, _ = start_policy(again)
    assert (b.version, again.follower.from_cache) == (4, True)
    assert b.data == v4 and b.digest == bundle_from_data(v4, "v4").digest
