"""The enforcement mode set on the real aus-server reaches a real ausd's
kernel maps without a restart: a managed user's denied destination is
blocked in enforce, passes and is reported as would-be denied in
visibility, and is blocked again once enforce is back; a ``mode`` in
ausd.yaml wins over the server."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import httpx
import pytest

from tests.support import lab
from tests.support.names import free_port
from tests.support.provision import provision
from tests.support.server_process import CLI, serving, wait_port

pytestmark = pytest.mark.kernel

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = ["urn:ietf:params:scim:schemas:core:2.0:Group"]
WORKLOAD = socket.gethostname()     # what ausd sends as X-Aus-Workload


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
        with httpx.Client(base_url=base, timeout=30, auth=tuple(token.split(":", 1))) as c:
            yield base, token, c


def _alice_may_reach_port_80(c, token, peer, alice) -> None:
    scim = {"Content-Type": "application/scim+json", "Authorization": f"Bearer {token}"}
    r = c.post("/scim/orgs/1/Users", headers=scim, auth=None, json={
        "schemas": [USER], "userName": alice.name, "active": True})
    assert r.status_code == 201, r.text
    r = c.post("/scim/orgs/1/Groups", headers=scim, auth=None, json={
        "schemas": GROUP, "displayName": "DEV", "members": [{"value": r.json()["id"]}]})
    assert r.status_code == 201, r.text
    dev = r.json()["id"]
    r = c.post("/api/orgs/1/rules", json={
        "name": "dev-web", "sources": [dev], "destinations": [f"{peer.v4}/32"],
        "services": ["80/tcp"]})
    assert r.status_code == 201, r.text
    provision(c, "/api/orgs/1", "dev-web")


def _set(c, path, mode):
    r = c.put(f"/api/orgs/1{path}", json={"mode": mode})
    assert r.status_code == 200, r.text
    return r.json()


def _in_force(d, mode, source):
    """Wait until ausd applies ``mode`` from ``source`` and the kernel's
    config map holds it."""
    lab.wait_until(lambda: (s := d.ctl_json("status"))["mode"] == mode
                   and s["mode_source"] == source
                   and d.ctl_json("maps")["config"]["mode"] == mode,
                   timeout=10, interval=0.05, what=f"mode {mode} from {source}")


def _audited(d, peer, port) -> list[dict]:
    out = d.ctl("flows", "--json", "--limit", "500").stdout.splitlines()
    return [f for f in map(json.loads, out)
            if f["dst"] == peer.v4 and f["dport"] == port and f["verdict"] == "audit"]


def test_the_server_switches_a_running_workload_between_enforce_and_visibility(
        cg, peer, people, aus_server):
    base, token, c = aus_server
    alice = people[0]["alice"]
    _alice_may_reach_port_80(c, token, peer, alice)
    # given ahead of the workload's first check-in; the org stays in visibility
    assert _set(c, f"/workloads/{WORKLOAD}/mode", "enforce")["mode_source"] == "workload"
    assert c.get("/api/orgs/1/mode").json()["mode"] == "visibility"

    with lab.ausd(cg, {}, policy_url=f"{base}/api/orgs/1/bundle", credentials=token,
                  bundle_wait=30) as d:
        d.start()
        pid = d.proc.pid
        status = d.ctl_json("status")
        assert (status["mode"], status["mode_source"], status["workload"]) == \
            ("enforce", "server:workload", WORKLOAD)
        assert f"mode:      enforce (from server:workload, workload {WORKLOAD})" in \
            d.ctl("status").stdout
        with lab.session(d, alice.uid):
            assert tcp(cg, alice, peer.v4, 80)["ok"]
            assert tcp(cg, alice, peer.v4, 443)["errno"] == "EPERM"
            # the check-in says what the workload applies
            lab.wait_until(lambda: [(w["name"], w["applied_mode"]) for w in
                                    c.get("/api/orgs/1/workloads").json()["items"]]
                           == [(WORKLOAD, "enforce")], what="the check-in of the mode")

            t0 = time.monotonic()
            _set(c, f"/workloads/{WORKLOAD}/mode", "visibility")
            _in_force(d, "visibility", "server:workload")
            took = time.monotonic() - t0
            print(f"server mode change to the kernel's config map: {took * 1000:.0f} ms")
            assert took < 3, took     # the long poll wakes; not the end of its wait
            assert tcp(cg, alice, peer.v4, 443)["ok"]
            lab.wait_until(lambda: _audited(d, peer, 443), what="the would-be denial")
            assert tcp(cg, alice, peer.v4, 80)["ok"]

            _set(c, f"/workloads/{WORKLOAD}/mode", "enforce")
            _in_force(d, "enforce", "server:workload")
            assert tcp(cg, alice, peer.v4, 443)["errno"] == "EPERM"

            # back to the org default (visibility), then the default to enforce
            _set(c, f"/workloads/{WORKLOAD}/mode", None)
            _in_force(d, "visibility", "server:org")
            assert tcp(cg, alice, peer.v4, 443)["ok"]
            _set(c, "/mode", "enforce")
            _in_force(d, "enforce", "server:org")
            assert tcp(cg, alice, peer.v4, 443)["errno"] == "EPERM"
            lab.wait_until(lambda: [w["applied_mode"] for w in
                                    c.get("/api/orgs/1/workloads").json()["items"]]
                           == ["enforce"], what="the check-in of the mode")
        assert d.proc.pid == pid and d.proc.poll() is None   # never restarted


def test_a_mode_in_ausd_yaml_wins_over_the_server(cg, peer, people, aus_server):
    base, token, c = aus_server
    alice = people[0]["alice"]
    _alice_may_reach_port_80(c, token, peer, alice)
    _set(c, "/mode", "enforce")
    _set(c, f"/workloads/{WORKLOAD}/mode", "enforce")
    with lab.ausd(cg, {}, policy_url=f"{base}/api/orgs/1/bundle", credentials=token,
                  bundle_wait=30, mode="visibility") as d:
        d.start()
        status = d.ctl_json("status")
        assert (status["mode"], status["mode_source"]) == ("visibility", "config")
        assert d.ctl_json("maps")["config"]["mode"] == "visibility"
        with lab.session(d, alice.uid):
            assert tcp(cg, alice, peer.v4, 443)["ok"]
            # a new bundle (a changed server mode) does not move it
            version = _set(c, f"/workloads/{WORKLOAD}/mode", "visibility")["policy_version"]
            _set(c, f"/workloads/{WORKLOAD}/mode", "enforce")
            lab.wait_until(lambda: d.ctl_json("status")["policy"]["version"] > version,
                           what="the new bundle in force")
            assert d.ctl_json("status")["mode_source"] == "config"
            assert d.ctl_json("maps")["config"]["mode"] == "visibility"
            assert tcp(cg, alice, peer.v4, 443)["ok"]
            lab.wait_until(lambda: [w["applied_mode"] for w in
                                    c.get("/api/orgs/1/workloads").json()["items"]]
                           == ["visibility"], what="the check-in of the mode")
