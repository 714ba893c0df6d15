"""The enforcement mode from the console (real Chromium, real aus-server):
set a workload's mode and the org default on the Workloads page, see them
there and in GET workloads; switching to enforce asks first."""

from __future__ import annotations

import datetime as dt

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from aus.server.db import Flow, open_database


def _fetch(org, name: str, mode: str) -> None:
    r = org.http.get("/bundle", headers={"X-Aus-Workload": name, "X-Aus-Enforcing": "1",
                                         "X-Aus-Mode": mode})
    assert r.status_code == 200


def _denials(org, workload: str, denied: int, would_deny: int) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    engine, sessions = open_database(org.server.db_url)
    try:
        with sessions.begin() as s:
            for i, (verdict, n) in enumerate((("denied", denied), ("would_deny", would_deny))):
                s.add(Flow(org_id=org.id, hour=now.replace(minute=0, second=0, microsecond=0),
                           workload=workload, login_uid=1000 + i, user_name="alice",
                           groups=["DEV"], process="curl", dst="192.0.2.7", proto="tcp",
                           port=443, verdict=verdict, rule="", first_seen=now, last_seen=now,
                           count=n))
    finally:
        engine.dispose()


def _row(console, name):
    return console.find(f"#workloads-table tr[data-workload='{name}']")


def _api_modes(org) -> dict:
    return {w["name"]: (w["mode"], w["mode_source"]) for w in org.get("/workloads")["items"]}


def test_set_a_workloads_mode_and_the_org_default_from_the_console(console, org):
    _fetch(org, "web-1", "visibility")
    _fetch(org, "web-2", "visibility")
    _denials(org, "web-1", denied=0, would_deny=42)
    console.sign_in()
    console.click_nav("Workloads")
    console.wait_heading("Workloads")
    console.wait(lambda: len(console.table_rows("workloads-table")) == 2
                 and all("Visibility" in r.text for r in console.table_rows("workloads-table")),
                 "two workloads with their mode")
    row = _row(console, "web-1")
    assert "org default" in console.find("td.mode", row).text
    assert console.find("td.would-deny", row).text == "42"
    assert console.find("td.denied", row).text == "0"
    assert Select(console.find("#org-mode-select")).first_selected_option.text == "Visibility"

    # web-1 to enforce: asked first; cancelling changes nothing
    Select(console.find("select[data-workload='web-1']")).select_by_visible_text("Enforce")
    dialog = console.wait(lambda: console.find("dialog[open]"), "the confirmation")
    assert "42 connections were reported as would be blocked" in dialog.text
    dialog.find_element(By.XPATH, ".//button[normalize-space()='Cancel']").click()
    console.wait(lambda: not console.finds("dialog[open]"), "the dialog to close")
    assert _api_modes(org)["web-1"] == ("visibility", "org")
    assert Select(console.find("select[data-workload='web-1']")).first_selected_option.text \
        .startswith("Org default")

    Select(console.find("select[data-workload='web-1']")).select_by_visible_text("Enforce")
    console.confirm_dialog("Switch to enforce")
    console.wait(lambda: "Enforce" in console.find("td.mode", _row(console, "web-1")).text
                 and "set for this workload" in console.find("td.mode", _row(console, "web-1")).text,
                 "web-1 in enforce on the page")
    assert _api_modes(org) == {"web-1": ("enforce", "workload"), "web-2": ("visibility", "org")}
    bundle = org.get("/bundle")
    assert bundle["enforcement"] == {"default": "visibility", "workloads": {"web-1": "enforce"}}
    # web-1 still says it applies visibility until its ausd takes the bundle
    applied = console.find("td.applied", _row(console, "web-1")).text
    assert "Visibility" in applied and "changing" in applied
    console.screenshot("console-workload-modes")

    # the org default to enforce, then web-1 back to the default
    Select(console.find("#org-mode-select")).select_by_visible_text("Enforce")
    console.d.find_element(By.XPATH, "//button[normalize-space()='Set default']").click()
    console.confirm_dialog("Switch to enforce")
    console.wait(lambda: "Enforce" in console.find("td.mode", _row(console, "web-2")).text,
                 "web-2 in enforce through the org default")
    assert org.get("/mode")["mode"] == "enforce"
    Select(console.find("select[data-workload='web-1']")).select_by_visible_text(
        "Org default (enforce)")
    console.wait(lambda: "org default" in console.find("td.mode", _row(console, "web-1")).text,
                 "web-1 back on the org default")
    assert _api_modes(org) == {"web-1": ("enforce", "org"), "web-2": ("enforce", "org")}

    # a workload not seen yet gets its mode ahead of its first check-in
    console.type(console.find("#new-workload-name"), "db-9")
    Select(console.find("#new-workload-mode")).select_by_visible_text("Visibility")
    console.d.find_element(By.XPATH, "//form//button[normalize-space()='Set']").click()
    console.wait(lambda: "not seen yet" in _row(console, "db-9").text, "db-9 listed")
    assert _api_modes(org)["db-9"] == ("visibility", "workload")
