"""What the tests do with the console, in the terms a person would use:
sign in, go to a page, type into a labelled field, read the error next to
a field."""

from __future__ import annotations

import base64
from pathlib import Path

from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

TIMEOUT = 15


class Console:
    def __init__(self, driver, base_url: str, org, shots: Path):
        self.d = driver
        self.base = base_url
        self.org = org
        self.shots = shots

    # -- navigation ------------------------------------------------------

    def reset(self) -> None:
        """A fresh tab state: signed out, on the console's page."""
        self.d.get(self.base + "/")
        self.d.execute_script("sessionStorage.clear()")
        self.d.get(self.base + "/#/groups")
        self.d.refresh()
        self.wait(lambda: self.d.find_element(By.NAME, "token").is_displayed(), "the sign-in form")

    def sign_in(self, token: str | None = None) -> None:
        box = self.d.find_element(By.NAME, "token")
        box.clear()
        box.send_keys((token or self.org.token) + Keys.ENTER)
        self.wait(lambda: self.d.find_element(By.ID, "nav").is_displayed(), "the signed-in navigation")

    def go(self, hash_: str, heading: str | None = None) -> None:
        self.d.execute_script("location.hash = arguments[0]", hash_)
        if heading:
            self.wait_heading(heading)

    def click_nav(self, name: str) -> None:
        self.d.find_element(By.ID, "nav").find_element(By.LINK_TEXT, name).click()

    def wait_heading(self, text: str) -> WebElement:
        def ready():
            h1 = self.d.find_element(By.CSS_SELECTOR, "main h1")
            return h1 if text in h1.text else None
        return self.wait(ready, f"heading {text!r}")

    # -- reading ---------------------------------------------------------

    def wait(self, cond, what: str, timeout: float = TIMEOUT):
        """cond() until truthy; a page that is still rendering (elements
        missing, replaced, or a list not filled yet) counts as not yet."""
        def attempt(_):
            try:
                return cond()
            except (NoSuchElementException, StaleElementReferenceException, IndexError):
                return None
        return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(
            attempt, f"waited {timeout} s for {what}")

    def find(self, css: str, within=None) -> WebElement:
        return (within or self.d).find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str, within=None) -> list[WebElement]:
        return (within or self.d).find_elements(By.CSS_SELECTOR, css)

    def field(self, label: str) -> WebElement:
        """The control a <label> with exactly this text belongs to."""
        lab = self.d.find_element(By.XPATH, f"//main//label[normalize-space()='{label}']")
        return self.d.find_element(By.ID, lab.get_attribute("for"))

    def error_next_to(self, control: WebElement) -> str:
        """The error message the control's aria-describedby names, once it
        is shown; it must sit in the control's own field, list entry or
        fieldset, and the control must be marked invalid."""
        found = self.d.execute_script("""
            const c = arguments[0];
            const ids = (c.getAttribute('aria-describedby') || '').split(' ').filter(Boolean);
            const errs = ids.map(id => document.getElementById(id))
                            .filter(e => e && e.classList.contains('field-error') && !e.hidden);
            if (!errs.length) return null;
            const box = c.closest('li, .field, fieldset');
            return [errs[0].textContent, box.contains(errs[0]), c.getAttribute('aria-invalid')];
            """, control)
        if not found:
            return ""
        text, near, invalid = found
        assert near and invalid == "true", (text, near, invalid)
        return text.strip()

    def script_errors(self) -> list[str]:
        """Uncaught script errors the page logged since the last call."""
        return [e["message"] for e in self.d.get_log("browser")
                if e["level"] == "SEVERE" and e.get("source") == "javascript"]

    def status(self) -> str:
        return self.d.find_element(By.ID, "status").text

    def policy_version(self) -> int:
        return int(self.d.find_element(By.ID, "policy-version-number").text.replace(",", ""))

    def wait_policy_version(self, version: int) -> None:
        self.wait(lambda: self.policy_version() == version, f"policy version {version} in the header")

    def table_rows(self, table_id: str) -> list[WebElement]:
        return self.finds(f"#{table_id} tbody tr")

    def traffic_rows(self) -> list[tuple[str, str, str, str]]:
        """(user group, destination, service, verdict badges) of each row
        the Traffic page shows; several badges joined by ", "."""
        out = []
        for tr in self.finds("#traffic-table tbody tr[data-dst]"):
            cells = tr.find_elements(By.CSS_SELECTOR, "th, td")
            badges = ", ".join(b.text for b in cells[3].find_elements(By.CSS_SELECTOR, ".badge"))
            out.append((tr.get_attribute("data-group"), cells[1].text, cells[2].text, badges))
        return out

    def focused(self) -> WebElement:
        return self.d.switch_to.active_element

    # -- acting ----------------------------------------------------------

    def type(self, control: WebElement, text: str, clear: bool = True) -> None:
        if clear:
            control.send_keys(Keys.CONTROL, "a")
            control.send_keys(Keys.DELETE)
        control.send_keys(text)

    def entry_inputs(self, key: str) -> list[WebElement]:
        return self.finds(f"input[data-entry='{key}']")

    def confirm_dialog(self, button: str = "Delete") -> None:
        dialog = self.wait(lambda: self.find("dialog[open]"), "the confirmation dialog")
        dialog.find_element(By.XPATH, f".//button[normalize-space()='{button}']").click()

    def screenshot(self, name: str) -> Path:
        """The whole page, not just the window, as <shots>/<name>.png."""
        size = self.d.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = self.d.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000), "scale": 1}})
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        assert path.stat().st_size > 10_000, path
        return path
