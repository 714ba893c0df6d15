"""The operator's rollout, end to end with the real pieces: a real ausd on
a test cgroup follows a real aus-server process (SQLite) and uploads its
flow records to it; headless Chromium drives the console.

A managed user's traffic in visibility mode appears on the Traffic page
under the user's name and group as would be blocked; a rule created from
that row goes into the draft, whose impact preview shows the flow as newly
allowed; provisioned, the kernel allows it; the workload switched to
enforce on the Workloads page refuses another destination with EPERM, and
the denial appears on the Traffic page and in GET traffic."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
from urllib.parse import quote

import pytest
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.support import console_harness, lab
from tests.support.console_pages import Console
from tests.support.polling import wait_until

pytestmark = pytest.mark.kernel

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
WORKLOAD = socket.gethostname()     # what ausd sends as X-Aus-Workload
PORT = 8050                          # a port the peer serves; DEV's first rule does not grant it
# A loaded 2-CPU machine: flow windows of 1 s, an upload, a page render.
SLOW = 60


@pytest.fixture
def server(tmp_path):
    with console_harness.aus_server(tmp_path) as s:
        yield s


@pytest.fixture
def console(server, tmp_path):
    org = server.new_org()
    with contextlib.closing(org.http), console_harness.browser() as b:
        c = Console(b.driver, server.url, org, shots=tmp_path)
        c.reset()
        yield c
        # The console must not throw: any uncaught script error fails the test.
        assert not c.script_errors()


def tcp(cg, user, addr, port) -> dict:
    return lab.act(cg, "tcp", addr, port, loginuid=user.uid, uid=user.uid, gid=user.gid)


def traffic(org, **query) -> list[dict]:
    return org.get("/traffic", params={"limit": 500, **query})["items"]


def kernel_flows(d, addr, port) -> list[dict]:
    out = d.ctl("flows", "--json", "--limit", "500").stdout.splitlines()
    return [f for f in map(json.loads, out) if f["dst"] == addr and f["dport"] == port]


def show_traffic(c: Console, user: str) -> None:
    """The Traffic page filtered on ``user``, rendered afresh (from another
    page, so no rows of an earlier visit are read)."""
    c.go("#/workloads", "Workloads")
    c.go(f"#/traffic?user={quote(user)}", "Traffic")


def test_traffic_to_rule_to_provision_to_enforce_from_the_console(cg, peer, people, server,
                                                                 console, tmp_path):
    c, org = console, console.org
    alice = people[0]["alice"]
    a, b = peer.v4, ipaddress.ip_address(peer.v6).compressed   # as ausd reports them
    assert org.get("/mode")["mode"] == "visibility"   # a new org's default

    # The directory pushes alice into DEV; DEV may reach A on port 80 only.
    uid = org.scim("POST", "/Users", {"schemas": [USER], "userName": alice.name, "active": True})["id"]
    dev = org.scim("POST", "/Groups", {"schemas": [GROUP], "displayName": "DEV",
                                       "members": [{"value": uid}]})["id"]
    org.post("/rules", {"name": "dev-web", "sources": [dev], "destinations": [f"{a}/32"],
                        "services": ["80/tcp"]})
    v1 = org.provision("DEV reaches the lab's web server")

    try:
        with lab.ausd(cg, {}, policy_url=org.bundle_url, credentials=org.token, bundle_wait=30,
                      flow_window=1.0) as d:
            assert "mode" not in yaml.safe_load(d.config_path.read_text())   # the server decides
            d.start()
            # (the first fetch may miss READY on a busy machine: ausd does not hold logins up)
            wait_until(lambda: ((s := d.ctl_json("status")).get("policy") or {}).get("version") == v1
                       and (s["mode"], s["mode_source"]) == ("visibility", "server:org"),
                       timeout=SLOW, what="ausd in visibility from the org default, on the first version")
            with lab.session(d, alice.uid, alice.uid, alice.gid):
                _visibility_to_rule(c, org, d, cg, alice, a, v1)
                _enforce_from_the_workloads_page(c, org, d, cg, alice, a, b)
    except BaseException:
        with contextlib.suppress(Exception):
            c.d.save_screenshot(str(tmp_path / "failure.png"))
            print(f"console at failure: {tmp_path / 'failure.png'}")
        raise


def _visibility_to_rule(c, org, d, cg, alice, a, v1):
    # Visibility: nothing blocks, the kernel reports what enforce would deny.
    for _ in range(3):
        assert tcp(cg, alice, a, PORT)["ok"]
    wait_until(lambda: [f["verdict"] for f in kernel_flows(d, a, PORT)] == ["audit"] * 3,
               what="the kernel's three would-be denials")
    seen = wait_until(lambda: traffic(org, user=alice.name, port=PORT), timeout=SLOW,
                      what="alice's flow uploaded to the server")
    # (one record per hour: a run across the hour's end has two)
    assert {(f["workload"], f["login_uid"], tuple(f["groups"]), f["dst"], f["proto"], f["verdict"], f["rule"])
            for f in seen} == {(WORKLOAD, alice.uid, ("DEV",), a, "tcp", "would_deny", "")}
    assert all(f["process"].startswith("python") for f in seen)
    would = wait_until(lambda: (n := sum(f["count"] for f in traffic(org, user=alice.name, port=PORT)))
                       >= 3 and n, timeout=SLOW, what="the three connections counted")
    assert would == 3

    # The Traffic page: under alice's name (the filter) and group DEV.
    c.sign_in()
    show_traffic(c, alice.name)
    c.wait(lambda: c.traffic_rows() == [("DEV", a, f"{PORT}/tcp", "would be blocked")],
           "alice's would-be-blocked row")
    assert "badge warn" in c.find(f"#traffic-table tr[data-dst='{a}'] .badge").get_attribute("class")
    assert c.find("#traffic-table tbody tr.group-row").text == "DEV"

    # Select it, Create rule: the form comes prefilled.
    c.find(f"#traffic-table tr[data-dst='{a}'] input[type=checkbox]").click()
    c.find("#traffic-create-rule").click()
    c.wait_heading("New rule")
    c.wait(lambda: [x.text for x in c.finds(".chip-name")] == ["DEV"], "DEV as the source")
    assert [i.get_attribute("value") for i in c.entry_inputs("destinations")] == [a]
    assert [i.get_attribute("value") for i in c.entry_inputs("services")] == [f"{PORT}/tcp"]
    c.type(c.field("Name"), "dev-app")
    c.find("#rule-form button[type=submit]").click()
    c.wait(lambda: "Saved rule “dev-app” to the draft" in c.status(), "the rule saved to the draft")
    assert org.policy_version() == v1 and d.ctl_json("status")["policy"]["version"] == v1

    # The draft: the new rule, and the preview shows alice's flow newly allowed.
    indicator = c.find("#draft-pending")
    c.wait(lambda: indicator.is_displayed(), "the draft-pending indicator")
    indicator.click()
    c.wait_heading("Draft")
    added = c.find("#draft-diff tr[data-change='added']")
    assert "dev-app" in added.text and "DEV" in added.text and f"{PORT}/tcp" in added.text
    c.d.find_element(By.XPATH, "//button[normalize-space()='Preview impact']").click()
    allowed = c.wait(lambda: c.find("#newly-allowed"), "the impact preview")
    assert allowed.find_element(By.TAG_NAME, "h3").text == "Newly allowed: 3 flows"
    assert alice.name in allowed.text and "DEV" in allowed.text and f"{a} tcp/{PORT}" in allowed.text
    assert "dev-app" in allowed.text
    assert c.find("#newly-blocked h3").text == "Newly blocked: 0 flows"

    # Provision with a note; the workload takes the new version.
    c.type(c.field("Note (what and why)"), "DEV uses the app on 8050")
    c.find("#provision").click()
    c.wait_heading("Policy history")
    v2 = org.policy_version()
    assert v2 > v1 and f"Provisioned policy version {v2}." in c.status()
    assert org.get(f"/policy/versions/{v2}")["note"] == "DEV uses the app on 8050"
    wait_until(lambda: d.ctl_json("status")["policy"]["version"] == v2, timeout=SLOW,
               what="ausd enforcing the provisioned version")

    # The kernel now allows it by the new rule (still in visibility: the
    # verdict is what changed).
    assert d.check(alice.uid, a, "tcp", PORT)["allowed"]
    assert tcp(cg, alice, a, PORT)["ok"]
    wait_until(lambda: [f["verdict"] for f in kernel_flows(d, a, PORT)][-1:] == ["allow"],
               what="the kernel's allow verdict")
    wait_until(lambda: [(f["verdict"], f["rule"]) for f in traffic(org, user=alice.name, port=PORT,
                                                                   verdict="allowed")]
               == [("allowed", "dev-app")], timeout=SLOW, what="the allowed flow uploaded")
    show_traffic(c, alice.name)
    c.wait(lambda: c.traffic_rows() == [("DEV", a, f"{PORT}/tcp", "would be blocked, allowed")],
           "the row with its allowed connection")
    badges = c.finds(f"#traffic-table tr[data-dst='{a}'] .badge")
    assert "badge ok" in badges[-1].get_attribute("class")


def _enforce_from_the_workloads_page(c, org, d, cg, alice, a, b):
    c.click_nav("Workloads")
    c.wait_heading("Workloads")
    row = f"#workloads-table tr[data-workload='{WORKLOAD}']"
    c.wait(lambda: "Visibility" in c.find(f"{row} td.mode").text, "the workload in visibility")
    c.wait(lambda: c.find(f"{row} td.would-deny").text == "3", "its would-be denials of the hour")
    Select(c.find(f"select[data-workload='{WORKLOAD}']")).select_by_visible_text("Enforce")
    dialog = c.wait(lambda: c.find("dialog[open]"), "the confirmation")
    assert "3 connections were reported as would be blocked" in dialog.text
    c.confirm_dialog("Switch to enforce")
    c.wait(lambda: "Enforce" in c.find(f"{row} td.mode").text, "the workload in enforce on the page")
    assert {w["name"]: (w["mode"], w["mode_source"]) for w in org.get("/workloads")["items"]} == \
        {WORKLOAD: ("enforce", "workload")}
    wait_until(lambda: (s := d.ctl_json("status"))["mode"] == "enforce"
               and s["mode_source"] == "server:workload"
               and d.ctl_json("maps")["config"]["mode"] == "enforce",
               timeout=SLOW, what="enforce in the kernel's config map")

    # Enforce: the rule still lets alice reach A; B, which no rule names, is refused.
    assert tcp(cg, alice, a, PORT)["ok"]
    assert tcp(cg, alice, b, PORT)["errno"] == "EPERM"
    wait_until(lambda: [f["verdict"] for f in kernel_flows(d, b, PORT)] == ["deny"],
               what="the kernel's denial")
    denied = wait_until(lambda: traffic(org, user=alice.name, verdict="denied"), timeout=SLOW,
                        what="the denial uploaded")
    assert [(f["dst"], f["port"], f["proto"], f["groups"], f["rule"], f["count"]) for f in denied] == \
        [(b, PORT, "tcp", ["DEV"], "", 1)]
    show_traffic(c, alice.name)
    c.wait(lambda: ("DEV", b, f"{PORT}/tcp", "blocked") in c.traffic_rows(), "the blocked row")
    assert "badge danger" in c.find(f"#traffic-table tr[data-dst='{b}'] .badge").get_attribute("class")
    c.screenshot("traffic-after-enforce")     # beside the test's tmp files
    c.click_nav("Workloads")
    c.wait_heading("Workloads")
    c.wait(lambda: c.find(f"{row} td.denied").text == "1", "the workload's denial of the hour")
    # what the workload says it applies, as its check-ins report it (the page refreshes itself)
    c.wait(lambda: c.find(f"{row} td.applied").text == "Enforce", "the applied mode", timeout=SLOW)
