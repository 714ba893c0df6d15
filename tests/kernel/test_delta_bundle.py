"""Delta bundles end to end: a real ausd long-polls a real aus-server; a
SCIM membership change reaches ausd as a delta (compressed), the kernel
follows it without a new login, and ``ausctl status`` says so. A delta
that does not fit the bundle held is refused and ausd fetches the whole
bundle at once, the policy in force staying meanwhile."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from aus.core.bundle import diff_documents
from tests.support import lab
from tests.support.bundle_server import BundleServer, bundle
from tests.support.names import free_port
from tests.support.provision import provision
from tests.support.server_process import CLI, serving, wait_port

pytestmark = pytest.mark.kernel

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def tcp(cg, user, addr, port):
    return lab.act(cg, "tcp", addr, port, loginuid=user.uid, uid=user.uid, gid=user.gid)


def test_a_membership_change_reaches_the_kernel_as_a_delta(cg, peer, people, tmp_path):
    users, _groups = people
    alice, bob = users["alice"], users["bob"]
    db = f"sqlite:///{tmp_path}/server.db"
    token = subprocess.run(CLI + ["api-key", "create", "--org", "1", "--db", db], check=True,
                           capture_output=True, text=True).stdout.strip()
    basic = tuple(token.split(":", 1))
    scim = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"}
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", db) as proc, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        wait_port(port, proc)

        def push(method, path, body):
            r = c.request(method, f"/scim/orgs/1{path}", json=body, headers=scim)
            assert r.status_code in (200, 201, 204), (path, r.status_code, r.text)
            return r.json() if r.content else None

        # Others in the group, as in a real directory: the delta is the change only.
        others = [f"colleague{i:03d}@contoso.com" for i in range(200)]
        ids = {name: push("POST", "/Users", {"schemas": [USER], "userName": name,
                                            "active": True})["id"]
               for name in [alice.name, bob.name, *others]}
        dev = push("POST", "/Groups", {"schemas": [GROUP], "displayName": "DEV", "members": [
            {"value": ids[n]} for n in [alice.name, *others]]})["id"]
        r = c.post("/api/orgs/1/rules", auth=basic, json={
            "name": "dev-web", "sources": [dev], "destinations": [f"{peer.v4}/32"],
            "services": ["80/tcp"]})
        assert r.status_code == 201, r.text
        version = provision(c, "/api/orgs/1", auth=basic)

        with lab.ausd(cg, {}, policy_url=f"http://127.0.0.1:{port}/api/orgs/1/bundle",
                      credentials=token, bundle_wait=30, mode="enforce") as d:
            d.start()
            srv = d.ctl_json("status")["policy"]["server"]
            assert srv["bundle_version"] == version
            first = srv["last_update"]
            assert (first["kind"], first["version"]) == ("full", version)
            with lab.session(d, alice.uid), lab.session(d, bob.uid):
                assert tcp(cg, alice, peer.v4, 80)["ok"]
                assert tcp(cg, bob, peer.v4, 80)["errno"] == "EPERM"

                push("PATCH", f"/Groups/{dev}", {"schemas": [PATCH], "Operations": [
                    {"op": "add", "path": "members", "value": [{"value": ids[bob.name]}]},
                    {"op": "remove", "path": f'members[value eq "{ids[alice.name]}"]'}]})
                lab.wait_until(lambda: d.check(bob.uid, peer.v4, "tcp", 80)["allowed"]
                               and not d.check(alice.uid, peer.v4, "tcp", 80)["allowed"],
                               timeout=5, interval=0.02, what="the delta in the kernel")
                assert tcp(cg, bob, peer.v4, 80)["ok"]
                assert tcp(cg, alice, peer.v4, 80)["errno"] == "EPERM"

            srv = d.ctl_json("status")["policy"]["server"]
            now = srv["last_update"]
            assert (now["kind"], now["from_version"]) == ("delta", version)
            assert now["version"] == srv["bundle_version"] > version
            assert srv["delta_refusals"] == 0
            # Smaller than the whole bundle compressed, and than a tenth of it plain.
            assert now["wire_bytes"] < first["wire_bytes"] / 2, (now, first)
            plain = c.get("/api/orgs/1/bundle", auth=basic,
                          headers={"Accept-Encoding": "identity"}).content
            assert now["wire_bytes"] < len(plain) / 10, (now, len(plain))
            text = d.ctl("status").stdout
            assert (f"last update: a delta from version {version} to version {now['version']}, "
                    f"{now['wire_bytes']} bytes on the wire") in text
            # The cache holds the whole bundle, the same as the server's.
            cached = json.loads((d.workdir / "bundle.json").read_text())["bundle"]
            full = c.get("/api/orgs/1/bundle", auth=basic)
            assert cached == full.json()


def lab_bundle(peer, version, members):
    return bundle(version, members, destinations=(f"{peer.v4}/32",))


def test_a_bad_delta_is_refused_and_the_full_bundle_fetched(cg, peer, people):
    users, _groups = people
    alice, bob = users["alice"], users["bob"]
    creds = ("aus-key-1", "s3cret-value")
    with BundleServer(credentials=creds, gzip=True) as srv:
        v1 = lab_bundle(peer, 1, {"DEV": [alice.name], "OPS": []})
        srv.publish(v1)
        with lab.ausd(cg, {}, policy_url=srv.url, credentials=":".join(creds),
                      bundle_wait=30, mode="enforce") as d:
            d.start()
            with lab.session(d, alice.uid), lab.session(d, bob.uid):
                assert tcp(cg, alice, peer.v4, 80)["ok"]
                lab.wait_until(lambda: len(srv.requests) >= 2, what="the long poll")
                assert srv.requests[-1].since == 1
                # Version 2 moves DEV from alice to bob; the delta says
                # otherwise (alice stays): its digest gives it away.
                v2 = lab_bundle(peer, 2, {"DEV": [bob.name], "OPS": []})
                bad = diff_documents(v1, v2)
                bad["members"]["remove"] = {}
                asked = len(srv.requests)
                srv.publish(v2, deltas={1: bad})
                lab.wait_until(lambda: d.check(bob.uid, peer.v4, "tcp", 80)["allowed"]
                               and not d.check(alice.uid, peer.v4, "tcp", 80)["allowed"],
                               timeout=5, interval=0.02, what="version 2 in the kernel")
                assert tcp(cg, alice, peer.v4, 80)["errno"] == "EPERM"
                assert tcp(cg, bob, peer.v4, 80)["ok"]
            refused, full = srv.requests[asked - 1], srv.requests[asked]
            assert refused.since == 1 and refused.delta
            assert full.since is None and not full.delta and "if-none-match" not in full.headers
            st = d.ctl_json("status")["policy"]
            assert st["version"] == 2 and st["error"] is None
            assert st["server"]["last_update"]["kind"] == "full"
            assert st["server"]["delta_refusals"] == 1
            assert "digest: the bundle the delta makes hashes to" in \
                st["server"]["last_delta_refused"]
            assert "refused, fetching the whole bundle" in d.read_log()
            assert "last refused delta (1 in all): delta from version 1" in d.ctl("status").stdout
