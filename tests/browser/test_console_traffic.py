"""The console's Traffic page in headless Chromium against a real
aus-server: flow rows (written into the store as ingest stores them) shown
grouped by user group, destination and service with verdict badges;
filters; and a rule created from selected rows that saves."""

from __future__ import annotations

import datetime as dt

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.support.flow_seed import flow, insert

UTC = dt.timezone.utc


def _seed(org) -> dict[str, str]:
    ids = org.seed(groups={"Contoso-Developers": ["alice@contoso.com", "bob@contoso.com"],
                           "Contoso-Ops": ["carol@contoso.com"]})
    now = dt.datetime.now(UTC)
    m = lambda n: now - dt.timedelta(minutes=n)  # noqa: E731
    insert(org.server.db_url, [
        flow(org.id, user="alice@contoso.com", uid=1001, groups=["Contoso-Developers"], workload="web-1",
             dst="10.20.1.5", port=443, verdict="would_deny", last_seen=m(5), count=3),
        flow(org.id, user="bob@contoso.com", uid=1002, groups=["Contoso-Developers"], workload="web-2",
             dst="10.20.1.9", port=443, verdict="denied", last_seen=m(7), count=2),
        flow(org.id, user="carol@contoso.com", uid=1003, groups=["Contoso-Ops"], workload="web-1",
             dst="2001:db8:5:6::7", port=22, verdict="allowed", rule="ops-ssh", last_seen=m(9), count=4),
        flow(org.id, user="dan", uid=1004, groups=[], workload="db-1", dst="192.0.2.50", port=53,
             proto="udp", verdict="allowed", rule="baseline", last_seen=m(11)),
        # Three days old: outside the default period.
        flow(org.id, user="alice@contoso.com", uid=1001, groups=["Contoso-Developers"],
             dst="10.99.0.1", port=8443, verdict="denied", last_seen=now - dt.timedelta(days=3)),
    ])
    # Another org's traffic never shows.
    insert(org.server.db_url, [flow(org.id + "-other", user="mallory", groups=["Contoso-Developers"],
                                    dst="10.20.1.66", port=443, last_seen=m(1))])
    return ids


def _rows(console) -> list[tuple[str, str, str, str]]:
    """(group, destination, service, verdict badges) of each row shown."""
    return console.traffic_rows()


def _wait_rows(console, expected, what):
    console.wait(lambda: _rows(console) == expected, what)


def _apply(console) -> None:
    console.find("#traffic-filters button[type=submit]").click()


def test_traffic_grouped_with_badges_filters_and_a_rule_from_selected_rows(console, org):
    ids = _seed(org)
    console.sign_in()
    console.click_nav("Traffic")
    console.wait_heading("Traffic")
    everything = [
        ("", "192.0.2.50", "53/udp", "allowed"),
        ("Contoso-Developers", "10.20.1.5", "443/tcp", "would be blocked"),
        ("Contoso-Developers", "10.20.1.9", "443/tcp", "blocked"),
        ("Contoso-Ops", "2001:db8:5:6::7", "22/tcp", "allowed"),
    ]
    _wait_rows(console, everything, "the grouped rows")
    # One block per user group, headed by its name.
    heads = [b.find_element(By.CSS_SELECTOR, "tr.group-row").text
             for b in console.finds("#traffic-table tbody")]
    assert heads == ["No user group (unmanaged users)", "Contoso-Developers", "Contoso-Ops"]
    alice = console.find("#traffic-table tr[data-dst='10.20.1.5']")
    assert "badge warn" in alice.find_element(By.CSS_SELECTOR, ".badge").get_attribute("class")
    assert [c.text for c in alice.find_elements(By.CSS_SELECTOR, "td.num")] == ["3", "1", "1"]
    bob = console.find("#traffic-table tr[data-dst='10.20.1.9'] .badge")
    assert "danger" in bob.get_attribute("class")
    console.screenshot("console-traffic")

    # Filters: each narrows the rows, and the address keeps them.
    console.type(console.field("User"), "alice@contoso.com")
    _apply(console)
    _wait_rows(console, [everything[1]], "alice's row")
    assert "user=alice%40contoso.com" in console.d.current_url
    console.type(console.field("User"), "")
    Select(console.field("Verdict")).select_by_visible_text("Blocked")
    _apply(console)
    _wait_rows(console, [everything[2]], "the blocked row")
    Select(console.field("Verdict")).select_by_visible_text("Any verdict")
    console.type(console.field("Destination"), "2001:db8:5::/48")
    _apply(console)
    _wait_rows(console, [everything[3]], "the IPv6 row by CIDR")
    console.type(console.field("Destination"), "")
    console.type(console.field("User group"), "Contoso-Developers")
    Select(console.field("Period")).select_by_visible_text("Last 7 days")
    _apply(console)
    _wait_rows(console, [everything[1], everything[2],
                         ("Contoso-Developers", "10.99.0.1", "8443/tcp", "blocked")], "seven days of one group")
    # A bad filter: the server's message, the field marked.
    console.type(console.field("Port"), "99999")
    _apply(console)
    alert = console.wait(lambda: console.find("#traffic-error") if console.find("#traffic-error").is_displayed()
                         else None, "the refusal")
    assert "'port'" in alert.text and "99999" in alert.text
    assert console.field("Port").get_attribute("aria-invalid") == "true"
    console.d.find_element(By.LINK_TEXT, "Clear").click()
    _wait_rows(console, everything, "all rows again")

    # Select the developers' two rows and create a rule, widened to /24.
    create = console.find("#traffic-create-rule")
    assert not create.is_enabled()
    for dst in ("10.20.1.5", "10.20.1.9"):
        console.find(f"#traffic-table tr[data-dst='{dst}'] input[type=checkbox]").click()
    assert console.find("#traffic-selection").text == "2 rows selected."
    Select(console.field("Destinations in the rule")).select_by_value("24")
    create.click()
    console.wait_heading("New rule")
    console.wait(lambda: [c.text for c in console.finds(".chip-name")] == ["Contoso-Developers"], "the source")
    assert [i.get_attribute("value") for i in console.entry_inputs("destinations")] == ["10.20.1.0/24"]
    assert [i.get_attribute("value") for i in console.entry_inputs("services")] == ["443/tcp"]
    v0 = org.policy_version()
    console.type(console.field("Name"), "dev-web")
    console.find("#rule-form button[type=submit]").click()
    console.wait(lambda: "Saved rule “dev-web”" in console.status(), "the saved rule")
    rule = next(r for r in org.get("/rules")["items"] if r["name"] == "dev-web")
    assert [s["id"] for s in rule["sources"]] == [ids["Contoso-Developers"]]
    assert rule["destinations"] == ["10.20.1.0/24"] and rule["services"] == ["443/tcp"]
    # the rule went into the draft: nothing changes until it is provisioned
    assert org.policy_version() == v0 and org.get("/policy")["draft"]["pending"] is True

    # IPv6 widens to /64; exact addresses stay as they are.
    console.click_nav("Traffic")
    _wait_rows(console, everything, "the rows")
    console.find("#traffic-table tr[data-dst='2001:db8:5:6::7'] input[type=checkbox]").click()
    console.find("#traffic-table tr[data-dst='192.0.2.50'] input[type=checkbox]").click()
    Select(console.field("Destinations in the rule")).select_by_value("24")
    console.find("#traffic-create-rule").click()
    console.wait_heading("New rule")
    console.wait(lambda: [c.text for c in console.finds(".chip-name")] == ["Contoso-Ops"], "the source")
    assert [i.get_attribute("value") for i in console.entry_inputs("destinations")] == [
        "2001:db8:5:6::/64", "192.0.2.0/24"]
    assert [i.get_attribute("value") for i in console.entry_inputs("services")] == ["22/tcp", "53/udp"]

    # A group the flows name that the server does not know: said, not guessed.
    console.go("#/rules/new?group=Contoso-Gone&group=Contoso-Ops&dest=10.20.1.5&service=443/tcp", "New rule")
    warning = console.wait(lambda: console.find("#rule-missing-groups"), "the unknown group")
    assert "“Contoso-Gone”" in warning.text
    console.wait(lambda: [c.text for c in console.finds(".chip-name")] == ["Contoso-Ops"], "the known one")
