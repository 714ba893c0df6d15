"""The console's policy lifecycle in headless Chromium against a real
aus-server: a rule edit waits in the draft (the header says so), the
draft page shows the diff and the impact preview on recent flows,
Provision publishes it with its note, the history lists who and when,
compares two versions and rolls back, and Discard drops the draft."""

from __future__ import annotations

import datetime as dt

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from aus.server.db import Flow, open_database


def _rule(name, source, dest, services):
    return {"name": name, "sources": [source], "destinations": dest, "services": services}


def _flows(db_url: str, org: str, rows) -> None:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    engine, sessions = open_database(db_url)
    try:
        with sessions.begin() as s:
            for i, (user, groups, dst, port, verdict, rule, count) in enumerate(rows):
                s.add(Flow(org_id=org, hour=now.replace(minute=0, second=0), workload="web-1",
                           login_uid=1000 + i, user_name=user, groups=groups, process="curl", dst=dst,
                           proto="tcp", port=port, verdict=verdict, rule=rule, first_seen=now,
                           last_seen=now, count=count))
    finally:
        engine.dispose()


def test_draft_preview_provision_history_rollback_and_discard(console, org):
    ids = org.seed(groups={"DEV": ["alice"], "OPS": ["carol"]})
    web = org.post("/rules", _rule("dev-web", ids["DEV"], ["10.0.0.0/8"], ["443/tcp"]))
    v1 = org.provision("the first rules")
    org.http.put(f"/rules/{web['id']}", json=_rule("dev-web", ids["DEV"], ["10.1.0.0/16"], ["443/tcp"]))
    org.post("/rules", _rule("ops-ssh", ids["OPS"], ["192.0.2.0/24"], ["22/tcp"]))
    _flows(org.server.db_url, org.id, [
        ("alice", ["DEV"], "10.2.3.4", 443, "allowed", "dev-web", 5),
        ("carol", ["OPS"], "192.0.2.1", 22, "would_deny", "", 2),
        ("alice", ["DEV"], "10.1.0.9", 443, "allowed", "dev-web", 9),
    ])

    console.sign_in()
    console.wait_heading("User groups")
    indicator = console.find("#draft-pending")
    console.wait(lambda: indicator.is_displayed(), "the draft-pending indicator")
    indicator.click()
    console.wait_heading("Draft")
    assert "2 pending changes against policy version" in console.find("main .lead").text
    changed = console.finds("#draft-diff tr[data-rule='dev-web']")
    assert [r.get_attribute("data-change") for r in changed] == ["changed-before", "changed-after"]
    assert "10.0.0.0/8" in changed[0].text and "10.1.0.0/16" in changed[1].text
    added = console.find("#draft-diff tr[data-change='added']")
    assert "ops-ssh" in added.text and "OPS" in added.text and "22/tcp" in added.text

    # The impact on the flows workloads reported.
    console.d.find_element(By.XPATH, "//button[normalize-space()='Preview impact']").click()
    blocked = console.wait(lambda: console.find("#newly-blocked"), "the preview")
    assert blocked.find_element(By.TAG_NAME, "h3").text == "Newly blocked: 5 flows"
    assert "alice" in blocked.text and "DEV" in blocked.text and "10.2.3.4 tcp/443" in blocked.text
    assert "10.1.0.9" not in blocked.text
    allowed = console.find("#newly-allowed")
    assert allowed.find_element(By.TAG_NAME, "h3").text == "Newly allowed: 2 flows"
    assert "carol" in allowed.text and "ops-ssh" in allowed.text
    assert "Flows of the last 7 days: 16 considered, 9 unchanged." in console.find("#preview-result").text
    console.screenshot("console-draft")

    # Provision with a note: the history shows it, with the key that did it.
    console.type(console.field("Note (what and why)"), "narrow dev-web, ops gets ssh")
    console.find("#provision").click()
    console.wait_heading("Policy history")
    v2 = org.policy_version()
    assert v2 > v1
    assert f"Provisioned policy version {v2}." in console.status()
    console.wait(lambda: not indicator.is_displayed(), "the indicator to go")
    rows = {int(r.get_attribute("data-version")): r for r in console.table_rows("versions-table")}
    assert sorted(rows) == [v1, v2]
    assert "narrow dev-web, ops gets ssh" in rows[v2].text and "in force" in rows[v2].text
    assert org.token.split(":")[0] in rows[v2].text and "the first rules" in rows[v1].text
    assert [r["name"] for r in org.get("/bundle")["policy"]["rules"]] == ["dev-web", "ops-ssh"]

    # Compare the two versions.
    Select(console.find("#diff-from")).select_by_value(str(v1))
    Select(console.find("#diff-to")).select_by_value(str(v2))
    console.d.find_element(By.XPATH, "//button[normalize-space()='Show diff']").click()
    diff = console.wait(lambda: console.find("#version-diff-result"), "the diff")
    assert "ops-ssh" in diff.find_element(By.CSS_SELECTOR, "tr[data-change='added']").text
    assert len(diff.find_elements(By.CSS_SELECTOR, "tr[data-rule='dev-web']")) == 2
    console.screenshot("console-history")

    # Roll back to the first version: a new version with its rules.
    console.find(f"button[aria-label='Roll back to version {v1}']").click()
    console.confirm_dialog("Roll back")
    console.wait(lambda: f"Rolled back to version {v1} as version" in console.status(), "the rollback")
    v3 = org.policy_version()
    assert v3 > v2
    bundle = org.get("/bundle")
    assert [(r["name"], r["destinations"]) for r in bundle["policy"]["rules"]] == [("dev-web", ["10.0.0.0/8"])]
    console.wait(lambda: len(console.table_rows("versions-table")) == 3, "three versions")

    # An edit, then Discard: the draft returns to the version in force.
    org.post("/rules", _rule("tmp", ids["OPS"], ["192.0.2.0/24"], ["80/tcp"]))
    console.go("#/draft", "Draft")
    console.find("#discard").click()
    console.confirm_dialog("Discard")
    console.wait(lambda: "Discarded the draft." in console.status(), "the discard")
    console.wait(lambda: console.find("#draft-empty").is_displayed(), "the empty draft")
    assert org.get("/draft")["pending"] is False
    assert [r["name"] for r in org.get("/rules")["items"]] == ["dev-web"]
    assert org.policy_version() == v3
