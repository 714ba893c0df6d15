"""The console's Audit page in headless Chromium against a real
aus-server: changes made through the API listed newest first with who
(the key's label and id), when, the action and the target; the before and
after of one change; the filter by kind of change; paging with "Show
more"; and nothing of another org's trail."""

from __future__ import annotations

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from sqlalchemy import update

from aus.server.db import ApiKey

LABEL = "Ops laptop"


def _label_key(org, label: str) -> str:
    key_id = org.token.partition(":")[0]
    with org.server.sessions.begin() as s:
        s.execute(update(ApiKey).where(ApiKey.id == key_id).values(label=label))
    return key_id


def _rows(console, keys: bool = False) -> list[tuple[str, str, str]]:
    """(action title, target, change) of each event row shown; without
    ``keys``, the rows of API keys made (the org's own key, made by the
    fixture, is the oldest event of every org) are left out."""
    out = []
    for tr in console.finds("#audit-table tbody tr[data-event]"):
        if not keys and tr.get_attribute("data-action").startswith("api_key."):
            continue
        out.append((tr.get_attribute("data-action"), console.find("th.target", tr).text.split("\n")[0],
                    console.find("td.change", tr).text))
    return out


def _apply(console) -> None:
    console.find("#audit-filters button[type=submit]").click()


def test_audit_lists_changes_with_before_and_after(console, org, aus_server):
    key_id = _label_key(org, LABEL)
    ids = org.seed(groups={"Contoso-Developers": ["alice@contoso.com"]})
    org.post("/ip-lists", {"name": "db", "entries": ["10.1.0.0/16"]})
    rule = org.post("/rules", {"name": "dev-web", "sources": [ids["Contoso-Developers"]],
                               "destinations": ["db"], "services": ["80/tcp"]})
    r = org.http.put(f"/rules/{rule['id']}", json={"name": "dev-web", "sources": [ids["Contoso-Developers"]],
                                                   "destinations": ["db"], "services": ["443/tcp"]})
    assert r.status_code == 200, r.text
    version = org.provision("web over TLS")
    r = org.http.put("/workloads/web-1/mode", json={"mode": "enforce"})
    assert r.status_code == 200, r.text
    # Another org's change never shows here.
    other = aus_server.new_org()
    try:
        other.post("/ip-lists", {"name": "other-org-list", "entries": ["192.0.2.0/24"]})
    finally:
        other.http.close()

    console.sign_in()
    console.click_nav("Audit")
    console.wait_heading("Audit")
    expected = [
        ("mode.set", "Workload web-1", "none (the default) → enforce"),
        ("policy.provision", f"version {version}", "rules added: dev-web; IP lists added: db"),
        ("rule.update", "dev-web", "changed: services"),
        ("rule.create", "dev-web", "created"),
        ("ip_list.create", "db", "created"),
    ]
    console.wait(lambda: _rows(console) == expected, "the five changes, newest first")
    assert "other-org-list" not in console.find("#audit-table").text
    update_row = console.find("#audit-table tr[data-action='rule.update']")
    who = console.find("td.who", update_row).text
    assert LABEL in who and key_id in who
    assert console.find("time", update_row).get_attribute("datetime").endswith("Z")
    assert "Rule changed" in update_row.text

    # The before and after of the rule change, opened and closed again.
    toggle = console.find("button[aria-expanded]", update_row)
    details = console.find(f"#{toggle.get_attribute('aria-controls')}")
    assert not details.is_displayed()
    toggle.click()
    console.wait(lambda: details.is_displayed(), "the before and after")
    assert toggle.get_attribute("aria-expanded") == "true"
    before, after = [p.text for p in details.find_elements(By.CSS_SELECTOR, "pre")]
    assert '"80/tcp"' in before and '"443/tcp"' in after
    assert '"Contoso-Developers"' in before and '"Contoso-Developers"' in after
    create_row = console.find("#audit-table tr[data-action='rule.create']")
    console.find("button[aria-expanded]", create_row).click()
    created = console.find(f"#{console.find('button[aria-expanded]', create_row).get_attribute('aria-controls')}")
    console.wait(lambda: created.is_displayed(), "the created rule's before and after")
    assert "Did not exist." in created.text
    console.screenshot("console-audit")
    toggle.click()
    console.wait(lambda: not details.is_displayed(), "the details closed")

    # Filter by kind: the address keeps the filter.
    Select(console.field("Change")).select_by_visible_text("Rules")
    _apply(console)
    console.wait(lambda: _rows(console) == expected[2:4], "the rule changes only")
    assert "action=rule.*" in console.d.current_url.replace("%2A", "*")
    Select(console.field("Change")).select_by_visible_text("Enforcement modes")
    console.type(console.field("API key"), "ak-nobody")
    _apply(console)
    console.wait(lambda: "No changes recorded match these filters" in console.find("main").text,
                 "nothing for an unknown key")
    console.d.find_element(By.LINK_TEXT, "Clear").click()
    console.wait(lambda: _rows(console) == expected, "every change again")


def test_audit_pages_with_show_more(console, org):
    for i in range(55):
        org.post("/ip-lists", {"name": f"list-{i:02d}", "entries": [f"10.{i}.0.0/16"]})
    console.sign_in()
    console.go("#/audit", "Audit")
    console.wait(lambda: len(_rows(console)) == 50, "the first page")
    assert _rows(console)[0][1] == "list-54" and _rows(console)[-1][1] == "list-05"
    more = console.find("#audit-more")
    assert more.is_displayed() and "more below" in console.find("#audit-summary").text
    more.click()
    console.wait(lambda: len(_rows(console, keys=True)) == 56, "the second page")
    assert [r[1] for r in _rows(console)] == [f"list-{i:02d}" for i in range(54, -1, -1)]
    assert _rows(console, keys=True)[-1][0] == "api_key.create"   # the org's key, made first
    assert not console.find("#audit-more").is_displayed()
    assert console.find("#audit-summary").text == "56 changes shown."
