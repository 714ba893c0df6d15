"""aus-server's log through the shared setup: with JOURNAL_STREAM naming its
stderr, uvicorn's records and the server's own carry their syslog priority
(``<N>``: this host runs no journald socket, so the stream form is what
journald would parse); otherwise plain timestamped lines."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "aus.server.cli"]
PLAIN = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_log(tmp: Path, journal: bool, *args: str) -> list[str]:
    """Serve until uvicorn says it runs, stop it; its stderr lines."""
    err = tmp / f"stderr-{journal}"
    port = free_port()
    with open(err, "wb") as f:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal:
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([*CLI, "serve", "--listen", f"127.0.0.1:{port}",
                                 "--db", f"sqlite:///{tmp / 'db.sqlite'}", *args],
                                stderr=f, stdout=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "Application startup complete" not in err.read_text(errors="replace"):
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)    # the server and its workers, which we started
        proc.wait(30)
    return [ln for ln in err.read_text().splitlines() if ln.strip()]


def test_priorities_under_systemd_plain_otherwise():
    assert not os.path.exists("/run/systemd/journal/socket"), \
        "this test expects a host without journald (the CI container)"
    with tempfile.TemporaryDirectory(prefix="aus-test-srvlog-") as d:
        tmp = Path(d)
        lines = serve_log(tmp, True)
        assert lines and all(re.match(r"<[0-7]>[\w.]+: ", ln) for ln in lines), lines
        assert any(ln.startswith("<6>uvicorn.error: Uvicorn running on") for ln in lines)
        plain = serve_log(tmp, False)
        assert plain and all(PLAIN.match(ln) for ln in plain), plain
        assert any("INFO uvicorn.error: Uvicorn running on" in ln for ln in plain)
