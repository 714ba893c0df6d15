"""End to end: Entra-style SCIM pushes into the real aus-server, a rule
written through its API, the bundle long-polled by ausd, and a logged-in
user's traffic allowed or denied in the kernel. Membership changes pushed
over SCIM (both PATCH shapes Entra sends) and a user disabled with the
string "False" reach the kernel without a new login."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from tests.support import lab
from tests.support.names import free_port
from tests.support.provision import provision
from tests.support.server_process import CLI, serving, wait_port
from tests.support.server_seed import insert_rule_past_api

pytestmark = pytest.mark.kernel

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = ["urn:ietf:params:scim:schemas:core:2.0:Group",
         "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"]
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def tcp(cg, user, addr, port):
    return lab.act(cg, "tcp", addr, port, loginuid=user.uid, uid=user.uid, gid=user.gid)


@pytest.fixture
def aus_server(tmp_path):
    db = f"sqlite:///{tmp_path}/server.db"
    token = subprocess.run(CLI + ["api-key", "create", "--org", "1", "--db", db], check=True,
                           capture_output=True, text=True).stdout.strip()
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", db) as proc:
        wait_port(port, proc)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as c:
            yield base, token, c


def _scim_push(c, token):
    """A SCIM request as Entra ID sends it, answered with one of ``want``."""
    scim = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"}

    def push(method, path, body=None, want=(200, 201, 204)):
        r = c.request(method, f"/scim/orgs/1{path}", json=body, headers=scim)
        assert r.status_code in want, (method, path, r.status_code, r.text)
        return r.json() if r.content else None
    return push


def test_scim_push_rule_bundle_kernel(cg, peer, people, aus_server):
    base, token, c = aus_server
    users, _groups = people
    alice, bob = users["alice"], users["bob"]
    push = _scim_push(c, token)
    basic = tuple(token.split(":", 1))

    # Entra: match by filter (no hit), then create; the same for the group.
    ids = {}
    for u in (alice, bob):
        assert push("GET", f'/Users?filter=userName eq "{u.name}"')["totalResults"] == 0
        ids[u.name] = push("POST", "/Users", {"schemas": [USER], "userName": u.name, "active": True,
                                              "externalId": f"ext-{u.name}",
                                              "name": {"givenName": u.name, "familyName": "Test"}})["id"]
    dev = push("POST", "/Groups", {"schemas": GROUP, "displayName": "DEV", "externalId": "grp-dev",
                                   "members": []})["id"]
    push("PATCH", f"/Groups/{dev}", {"schemas": [PATCH], "Operations": [
        {"op": "Add", "path": "members", "value": [{"value": ids[alice.name]}]}]})

    r = c.post("/api/orgs/1/rules", auth=basic, json={
        "name": "dev-web", "sources": [dev], "destinations": [f"{peer.v4}/32", f"{peer.v6}/128"],
        "services": ["80/tcp"]})
    assert r.status_code == 201, r.text
    version = provision(c, "/api/orgs/1", "dev-web", auth=basic)

    with lab.ausd(cg, {}, policy_url=f"{base}/api/orgs/1/bundle", credentials=token,
                  bundle_wait=30, mode="enforce") as d:   # a new org's default: visibility
        d.start()
        st = d.ctl_json("status")["policy"]
        assert st["source"] == "server" and st["version"] == version, st
        with lab.session(d, alice.uid) as reply, lab.session(d, bob.uid):
            assert reply["rules"] == ["dev-web"] and reply["bundle_groups"] == ["DEV"]
            assert tcp(cg, alice, peer.v4, 80)["ok"]
            assert tcp(cg, alice, peer.v4, 443)["errno"] == "EPERM"
            assert tcp(cg, bob, peer.v4, 80)["errno"] == "EPERM"

            # The workload checked in with the version it enforces.
            lab.wait_until(lambda: any(w["enforcing_version"] == version for w in
                                       c.get("/api/orgs/1/workloads", auth=basic).json()["items"]),
                           what="the workload check-in")

            # aadOptscim062020 shape: add bob, remove alice by value filter path.
            t0 = time.monotonic()
            push("PATCH", f"/Groups/{dev}", {"schemas": [PATCH], "Operations": [
                {"op": "add", "path": "members", "value": [{"value": ids[bob.name]}]},
                {"op": "remove", "path": f'members[value eq "{ids[alice.name]}"]'}]})
            lab.wait_until(lambda: not d.check(alice.uid, peer.v4, "tcp", 80)["allowed"]
                           and d.check(bob.uid, peer.v4, "tcp", 80)["allowed"],
                           timeout=5, interval=0.02, what="the SCIM change in the kernel")
            assert time.monotonic() - t0 < 3
            assert tcp(cg, alice, peer.v4, 80)["errno"] == "EPERM"
            assert tcp(cg, bob, peer.v4, 80)["ok"]

            # Entra disables bob with the string "False": his rules go.
            push("PATCH", f"/Users/{ids[bob.name]}", {"schemas": [PATCH], "Operations": [
                {"op": "Replace", "path": "active", "value": "False"}]})
            lab.wait_until(lambda: not d.check(bob.uid, peer.v4, "tcp", 80)["allowed"],
                           timeout=5, interval=0.02, what="the disabled user's rules to go")
            assert tcp(cg, bob, peer.v4, 80)["errno"] == "EPERM"

            # Default shape: remove by value list, then add alice back.
            push("PATCH", f"/Groups/{dev}", {"schemas": [PATCH], "Operations": [
                {"op": "Remove", "path": "members", "value": [{"value": ids[bob.name]}]},
                {"op": "Add", "path": "members", "value": [{"value": ids[alice.name]}]}]})
            lab.wait_until(lambda: d.check(alice.uid, peer.v4, "tcp", 80)["allowed"],
                           timeout=5, interval=0.02, what="alice back in DEV")
            assert tcp(cg, alice, peer.v4, 80)["ok"]

            # Deleting the rule in the API takes her access away.
            rule_id = c.get("/api/orgs/1/rules", auth=basic).json()["items"][0]["id"]
            assert c.delete(f"/api/orgs/1/rules/{rule_id}", auth=basic).status_code == 200
            provision(c, "/api/orgs/1", "without dev-web", auth=basic)
            lab.wait_until(lambda: not d.check(alice.uid, peer.v4, "tcp", 80)["allowed"],
                           timeout=5, interval=0.02, what="the rule deletion")
            assert tcp(cg, alice, peer.v4, 80)["errno"] == "EPERM"


def test_after_the_freeze_attempts_removals_and_disables_reach_the_kernel(
        cg, peer, people, aus_server, tmp_path):
    """Each write that used to freeze an org's bundle is refused; a clash
    written past the API still fails the build, and then a SCIM removal
    and a SCIM disable still take the users' access away in the kernel."""
    base, token, c = aus_server
    users, _groups = people
    alice, bob = users["alice"], users["bob"]
    push = _scim_push(c, token)
    basic = tuple(token.split(":", 1))

    ids = {u.name: push("POST", "/Users", {"schemas": [USER], "userName": u.name, "active": True})["id"]
           for u in (alice, bob)}
    dev = push("POST", "/Groups", {"schemas": GROUP, "displayName": "DEV", "externalId": "grp-dev",
                                   "members": [{"value": ids[alice.name]},
                                               {"value": ids[bob.name]}]})["id"]
    rule = {"name": "dev-web", "sources": [dev], "destinations": [f"{peer.v4}/32"],
            "services": ["80/tcp"]}
    assert c.post("/api/orgs/1/rules", auth=basic, json=rule).status_code == 201

    # The three freezes of the past: refused, nothing committed.
    assert c.post("/api/orgs/1/rules", auth=basic, json={**rule, "name": "DEV-WEB"}).status_code == 409
    assert c.post("/api/orgs/1/ip-lists", auth=basic,
                  json={"name": "tcp", "entries": [f"{peer.v4}/32"]}).status_code == 422
    push("POST", "/Groups", {"schemas": GROUP, "displayName": "DEV2", "externalId": "GRP-DEV"},
         want=(409,))
    assert [r["name"] for r in c.get("/api/orgs/1/rules", auth=basic).json()["items"]] == ["dev-web"]
    provision(c, "/api/orgs/1", auth=basic)
    assert c.get("/api/orgs/1/policy", auth=basic).json()["build"]["ok"] is True

    with lab.ausd(cg, {}, policy_url=f"{base}/api/orgs/1/bundle", credentials=token,
                  bundle_wait=30, mode="enforce") as d:   # a new org's default: visibility
        d.start()
        with lab.session(d, alice.uid), lab.session(d, bob.uid):
            assert tcp(cg, alice, peer.v4, 80)["ok"] and tcp(cg, bob, peer.v4, 80)["ok"]

            # A clash written past the API: the policy cannot be built.
            insert_rule_past_api(f"sqlite:///{tmp_path}/server.db", "1", "Dev-Web", dev)
            lab.wait_until(lambda: not c.get("/api/orgs/1/policy", auth=basic).json()["build"]["ok"],
                           timeout=10, what="the failed build on /policy")

            push("PATCH", f"/Groups/{dev}", {"schemas": [PATCH], "Operations": [
                {"op": "remove", "path": f'members[value eq "{ids[alice.name]}"]'}]})
            lab.wait_until(lambda: not d.check(alice.uid, peer.v4, "tcp", 80)["allowed"],
                           timeout=5, interval=0.02, what="alice's removal in the kernel")
            assert tcp(cg, alice, peer.v4, 80)["errno"] == "EPERM"
            assert tcp(cg, bob, peer.v4, 80)["ok"]

            push("PATCH", f"/Users/{ids[bob.name]}", {"schemas": [PATCH], "Operations": [
                {"op": "Replace", "path": "active", "value": "False"}]})
            lab.wait_until(lambda: not d.check(bob.uid, peer.v4, "tcp", 80)["allowed"],
                           timeout=5, interval=0.02, what="bob's disable in the kernel")
            assert tcp(cg, bob, peer.v4, 80)["errno"] == "EPERM"
            build = c.get("/api/orgs/1/policy", auth=basic).json()["build"]
            assert not build["ok"] and "duplicate rule name 'Dev-Web'" in build["error"], build
