"""The console under test: a real ``aus-server serve`` on a free loopback
port (SQLite in a given directory) and Debian's headless Chromium driven by
Selenium through /usr/bin/chromedriver. Used by the console tests and by
the kernel test that drives the console while a real ausd reports to the
same server. Every process started here is ended by its PID (and its
process group), on failure too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from .names import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH = 1280

# As root Chromium needs --no-sandbox. Background networking, component
# updates and sync would reach out to the internet, which a closed network
# answers with refused connections.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
    "--lang=en-US", "--force-device-scale-factor=1", f"--window-size={WIDTH},900",
]


def need_chromium() -> None:
    """Fail (as root) or skip (otherwise) unless Chromium and chromedriver
    are installed."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if os.access(path, os.X_OK):
            continue
        msg = f"{path} is missing: scripts/server-packages.sh installs Debian's chromium and chromium-driver"
        if os.geteuid() == 0:
            pytest.fail(msg)
        pytest.skip(msg + " (needs root)")


def end(proc: subprocess.Popen, grace: float = 10) -> None:
    """End a process we started (and its process group) by its PID."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class AusServer:
    def __init__(self, workdir: Path):
        self.db_url = f"sqlite:///{workdir}/aus-server.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "aus-server.log"
        self.proc: subprocess.Popen | None = None
        self.engine = None
        self._orgs = itertools.count(1)

    def start(self) -> "AusServer":
        from aus.server.db import open_database

        self.engine, self.sessions = open_database(self.db_url)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aus.server.cli", "serve", "--listen", f"127.0.0.1:{self.port}",
                 "--db", self.db_url, "--log-level", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"aus-server exited {self.proc.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"aus-server did not answer within 30 s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            end(self.proc)
        if self.engine is not None:
            self.engine.dispose()

    def new_org(self) -> "Org":
        from aus.server.auth import create_key

        org = f"org{next(self._orgs)}"
        return Org(self, org, create_key(self.sessions, org))


@contextlib.contextmanager
def aus_server(workdir: Path):
    """A started AusServer, stopped afterwards (also when starting fails)."""
    server = AusServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class Org:
    """An org of the running server, with its API key and a plain HTTP
    client for what the browser is not the subject of (set-up, checks)."""

    def __init__(self, server: AusServer, org: str, token: str):
        self.server, self.id, self.token = server, org, token
        key, _, secret = token.partition(":")
        self.http = httpx.Client(base_url=f"{server.url}/api/orgs/{org}", auth=(key, secret), timeout=30)

    @property
    def bundle_url(self) -> str:
        return f"{self.server.url}/api/orgs/{self.id}/bundle"

    def get(self, path: str, **kw) -> dict:
        r = self.http.get(path, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def scim(self, method: str, path: str, body: dict | None = None, want=(200, 201, 204)) -> dict | None:
        """A request as Entra ID's provisioning service sends it."""
        r = httpx.request(method, f"{self.server.url}/scim/orgs/{self.id}{path}", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {self.token}",
                                   "Content-Type": "application/scim+json"})
        assert r.status_code in want, (method, path, r.status_code, r.text)
        return r.json() if r.content else None

    def policy_version(self) -> int:
        return self.get("/policy")["version"]

    def provision(self, note: str = "") -> int:
        """Publish the org's draft; the new policy version."""
        from .provision import provision

        return provision(self.http, "", note)

    def seed(self, **kw) -> dict[str, str]:
        from .server_seed import seed

        return seed(self.server.db_url, self.id, **kw)


class Browser:
    """Headless Chromium under chromedriver, both in a process group of
    their own."""

    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="aus-console-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={self.profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.service = Service(CHROMEDRIVER, popen_kw={"start_new_session": True})
        self.driver = webdriver.Chrome(options=options, service=self.service)
        self.driver.set_page_load_timeout(30)

    def close(self) -> None:
        proc = self.service.process
        try:
            self.driver.quit()
        finally:
            if proc is not None:
                end(proc, grace=5)
            self._end_strays()
            shutil.rmtree(self.profile, ignore_errors=True)

    def _end_strays(self) -> None:
        # Chromium helpers that outlived chromedriver: found by our profile dir.
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if self.profile.encode() in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def browser():
    """Headless Chromium, closed afterwards with every process it started."""
    need_chromium()
    b = Browser()
    try:
        yield b
    finally:
        b.close()
