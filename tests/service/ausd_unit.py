"""ausd's unit in the container, seen from a test: its state, started when
it is not, and its journal read from a cursor on."""

from __future__ import annotations

from tests.support.polling import wait_until


def state(m, *props: str) -> dict[str, str]:
    return m.show("ausd", "ActiveState", "SubState", "MainPID", "NRestarts", *props)


def ensure_running(box) -> dict[str, str]:
    m = box.m
    # Also resets the start limit (StartLimitBurst=), which the restarts of
    # these tests would otherwise use up.
    m.systemctl("reset-failed", "ausd", check=False)
    if state(m)["ActiveState"] != "active":
        m.systemctl("start", "ausd")
    s = state(m)
    assert (s["ActiveState"], s["SubState"]) == ("active", "running"), s
    return s


def cursor(m) -> str:
    out = m.run("journalctl", "--no-pager", "-n", "1", "--show-cursor", "-o", "cat").stdout
    return [line for line in out.splitlines() if line.startswith("-- cursor: ")][-1][11:]


def log_since(m, after: str) -> str:
    return m.run("journalctl", "--no-pager", "-o", "cat", "-u", "ausd",
                 f"--after-cursor={after}").stdout


def wait_log(m, after: str, text: str, timeout: float = 15) -> str:
    def found():
        log = log_since(m, after)
        return log if text in log else ""
    return wait_until(found, timeout, interval=0.2, what=f"{text!r} in ausd's journal")
