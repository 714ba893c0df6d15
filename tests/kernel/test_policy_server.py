"""ausd with its policy from a policy server: a stand-in bundle server on
loopback (tests/support/bundle_server.py) serves the long poll. A membership
given only by the bundle decides a logged-in user's traffic; a new bundle
withdraws it without a new login; a restart with the server down enforces
the cached bundle."""

import signal
import time

import pytest

from tests.support import lab
from tests.support.bundle_server import BundleServer, bundle

pytestmark = pytest.mark.kernel

CREDS = ("aus-key-1", "s3cret-value")


def lab_bundle(peer, version, members):
    return bundle(version, members, destinations=(f"{peer.v4}/32", f"{peer.v6}/128"))


def tcp(cg, user, addr, port):
    return lab.act(cg, "tcp", addr, port, loginuid=user.uid, uid=user.uid, gid=user.gid)


def test_bundle_membership_follows_the_server(cg, peer, people):
    users, _groups = people
    alice, bob = users["alice"], users["bob"]
    with BundleServer(credentials=CREDS) as srv:
        # alice is in DEV only through the bundle, under her name in another case
        srv.publish(lab_bundle(peer, 1, {"DEV": [alice.name.upper()], "OPS": []}))
        with lab.ausd(cg, {}, policy_url=srv.url, credentials=":".join(CREDS),
                      bundle_wait=30) as d:
            d.start()
            st = d.ctl_json("status")["policy"]
            assert st["source"] == "server" and st["version"] == 1 and st["error"] is None
            server = st["server"]
            assert server["url"] == srv.url and server["bundle_version"] == 1
            assert server["etag"] == srv.etag and server["from_cache"] is False
            assert server["cache"] == str(d.workdir / "bundle.json")
            assert (d.workdir / "bundle.json").stat().st_mode & 0o777 == 0o600
            assert d.ctl_json("maps")["config"]["policy_version"] == 1

            with lab.session(d, alice.uid) as reply:
                assert reply["rules"] == ["dev-web"] and reply["bundle_groups"] == ["DEV"]
                assert tcp(cg, alice, peer.v4, 80) == {"ok": True, "errno": None}
                assert tcp(cg, alice, peer.v4, 443) == {"ok": False, "errno": "EPERM"}
                assert d.check(alice.uid, peer.v6, "tcp", 80)["rule"] == "dev-web"
                me = [u for u in d.ctl_json("users")["users"] if u["login_uid"] == alice.uid][0]
                assert me["bundle_groups"] == ["DEV"] and "DEV" not in me["nss_groups"]
                assert me["bundle_version"] == 1 and me["rules"] == ["dev-web"]
                table = d.ctl("users").stdout
                assert "DEV(bundle)" in table and "nss+bundle v1" in table

                # the server withdraws her membership: no new login needed
                lab.wait_until(lambda: len(srv.requests) >= 2, what="the long poll")
                asked = len(srv.requests)
                t0 = time.monotonic()
                srv.publish(lab_bundle(peer, 2, {"DEV": [bob.name], "OPS": []}))
                lab.wait_until(lambda: not d.check(alice.uid, peer.v4, "tcp", 80)["allowed"],
                               timeout=5, interval=0.02, what="the bundle to withdraw DEV")
                took = time.monotonic() - t0
                assert took < 2.0, took
                assert tcp(cg, alice, peer.v4, 80) == {"ok": False, "errno": "EPERM"}
                # the poll that brought version 2 was made enforcing 1; the
                # next one tells the server version 2 is in force
                assert srv.requests[asked - 1].headers["x-aus-enforcing"] == "1"
                assert srv.requests[asked].headers["x-aus-enforcing"] == "2"
                st = d.ctl_json("status")["policy"]
                assert st["version"] == 2 and st["server"]["bundle_version"] == 2
                assert d.ctl_json("maps")["config"]["policy_version"] == 2

                # a bad bundle is refused; version 2 stays in force
                bad = lab_bundle(peer, 3, {"DEV": [alice.name]})
                bad["policy"]["rules"][0]["services"] = ["80/tcpp"]
                srv.publish(bad)
                lab.wait_until(lambda: d.ctl_json("status")["policy"]["error"],
                               what="the refusal in status")
                st = d.ctl_json("status")["policy"]
                assert "policy.rules[0].services[0]: '80/tcpp'" in st["error"]
                assert st["version"] == 2
                assert "last bundle refused" in d.ctl("status").stdout
                assert tcp(cg, alice, peer.v4, 80)["errno"] == "EPERM"

                # ausctl reload asks at once rather than at the end of the wait
                n = len(srv.requests)
                assert "re-fetch" in d.ctl("reload").stdout
                lab.wait_until(lambda: any(r.wait == 0 for r in srv.requests[n:]),
                               timeout=2, what="an immediate re-fetch")

                # restart with the server down: the cached bundle (v2) at once
                d.stop(signal.SIGTERM)
                srv.stop()
                d.start()
                st = d.ctl_json("status")["policy"]
                assert st["version"] == 2 and st["server"]["from_cache"] is True
                lab.wait_until(lambda: d.ctl_json("status")["policy"]["server"]["last_error"],
                               what="the server error in status")
                assert "Connection refused" in \
                    d.ctl_json("status")["policy"]["server"]["last_error"]
                assert "from the cache" in d.ctl("status").stdout
                assert not d.check(alice.uid, peer.v4, "tcp", 80)["allowed"]

                # the server comes back with alice in DEV again
                srv.publish(lab_bundle(peer, 4, {"DEV": [alice.name]}))
                srv.start()
                lab.wait_until(lambda: d.check(alice.uid, peer.v4, "tcp", 80)["allowed"],
                               timeout=15, what="the bundle after the server came back")
                assert tcp(cg, alice, peer.v4, 80)["ok"]
                st = d.ctl_json("status")["policy"]["server"]
                assert st["from_cache"] is False and st["last_error"] is None
