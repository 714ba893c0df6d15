"""Fixtures for the console tests: a real ``aus-server serve`` on a free
loopback port (SQLite under the session's tmp dir) and Debian's headless
Chromium driven by Selenium through /usr/bin/chromedriver
(tests/support/console_harness.py).

Each test gets an org of its own (a fresh API key), so tests share one
server and one browser yet see nothing of each other's data. Every process
started here is ended by its PID at the end of the session, on failure too.

Screenshots go to the test's tmp dir; with ``AUS_CONSOLE_SCREENSHOTS=1``
they go to docs/img/ instead (see docs/console.md).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from tests.support import console_harness
from tests.support.console_pages import Console

REPO = Path(__file__).resolve().parents[2]
DOCS_IMG = REPO / "docs" / "img"


@pytest.fixture(scope="session")
def aus_server(tmp_path_factory):
    with console_harness.aus_server(tmp_path_factory.mktemp("aus-server")) as server:
        yield server


@pytest.fixture
def org(aus_server):
    o = aus_server.new_org()
    try:
        yield o
    finally:
        o.http.close()


@pytest.fixture(scope="session")
def browser():
    with console_harness.browser() as b:
        yield b


@pytest.fixture
def console(browser, aus_server, org, request, tmp_path):
    c = Console(browser.driver, aus_server.url, org, shots=_shot_dir(tmp_path))
    c.reset()
    browser.driver.get_log("browser")   # drop what earlier tests left
    yield c
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        # What the page showed when the test failed, beside the test's tmp files.
        with contextlib.suppress(Exception):
            browser.driver.save_screenshot(str(tmp_path / "failure.png"))
            print(f"console at failure: {tmp_path / 'failure.png'}")
    # The console must not throw: any uncaught script error fails the test.
    errors = c.script_errors()
    assert not errors, errors


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _shot_dir(tmp_path: Path) -> Path:
    if os.environ.get("AUS_CONSOLE_SCREENSHOTS"):
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        return DOCS_IMG
    return tmp_path
