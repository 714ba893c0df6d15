"""The one logging setup (aus.logs.setup) in a real process: native
journal entries with priorities and fields when stderr is the stream
JOURNAL_STREAM names (received here on a socket the setup is pointed
at), ``<N>``-prefixed stderr lines when that socket takes nothing, and
plain lines when stderr is not the journal's stream."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from aus.core import journal

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = """\
import logging, sys
from aus.logs import setup as logsetup
logsetup.setup(sys.argv[1], "aus-test", journal_socket=sys.argv[2])
log = logging.getLogger("aus.test")
log.debug("debug line")
log.info("info line", extra=logsetup.fields(login_uid=1000, user="alice", rule=None))
log.warning("warning line")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("it failed")
"""


def run(tmp: Path, *, stream: str | None, sock: Path, level: str = "debug") -> str:
    """Run PROGRAM with stderr to a file; JOURNAL_STREAM: "match" (the
    file's device:inode), "other" (another file's) or None (unset)."""
    prog = tmp / "prog.py"
    prog.write_text(PROGRAM)
    err = tmp / "stderr"
    with open(err, "wb") as f:
        st = os.fstat(f.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        env["PYTHONPATH"] = f"{ROOT / 'daemon'}:{ROOT}"
        if stream == "match":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif stream == "other":
            other = os.stat(prog)
            env["JOURNAL_STREAM"] = f"{other.st_dev}:{other.st_ino}"
        subprocess.run([sys.executable, str(prog), level, str(sock)], stderr=f, env=env,
                       check=True, timeout=60)
    return err.read_text()


def receive(rx: socket.socket) -> list[dict[str, str]]:
    out = []
    rx.setblocking(False)
    while True:
        try:
            out.append(journal.parse(rx.recv(1 << 20)))
        except BlockingIOError:
            return out


def test_native_entries_with_priorities_and_fields():
    with tempfile.TemporaryDirectory(prefix="aus-test-log-") as d:
        tmp = Path(d)
        path = tmp / "journal.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
            rx.bind(str(path))
            stderr = run(tmp, stream="match", sock=path)
            got = receive(rx)
    assert stderr == ""
    assert [(e["MESSAGE"].splitlines()[0], e["PRIORITY"]) for e in got] == [
        ("debug line", "7"), ("info line", "6"), ("warning line", "4"), ("it failed", "3")]
    for e in got:
        assert e["SYSLOG_IDENTIFIER"] == "aus-test" and e["LOGGER"] == "aus.test"
        assert e["CODE_FILE"].endswith("prog.py") and e["CODE_FUNC"] == "<module>"
        assert int(e["TID"]) > 0
    info = got[1]
    assert (info["AUS_LOGIN_UID"], info["AUS_USER"]) == ("1000", "alice")
    assert "AUS_RULE" not in info and "AUS_LOGIN_UID" not in got[2]
    assert info["CODE_LINE"] == "6"
    # A traceback is one entry (the binary form carries its newlines).
    assert "Traceback" in got[3]["MESSAGE"] and "ZeroDivisionError" in got[3]["MESSAGE"]


def test_level_filters_entries():
    with tempfile.TemporaryDirectory(prefix="aus-test-log-") as d:
        tmp = Path(d)
        path = tmp / "journal.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
            rx.bind(str(path))
            run(tmp, stream="match", sock=path, level="warning")
            got = receive(rx)
    assert [e["PRIORITY"] for e in got] == ["4", "3"]


def test_prefixed_lines_when_the_journal_socket_takes_nothing():
    with tempfile.TemporaryDirectory(prefix="aus-test-log-") as d:
        tmp = Path(d)
        stderr = run(tmp, stream="match", sock=tmp / "no-journal-here")
    lines = stderr.splitlines()
    assert lines[:3] == ["<7>aus.test: debug line", "<6>aus.test: info line",
                         "<4>aus.test: warning line"]
    # Every line of a traceback keeps its priority.
    assert lines[3] == "<3>aus.test: it failed"
    assert len(lines) > 5 and all(line.startswith("<3>aus.test: ") for line in lines[3:])
    assert lines[-1] == "<3>aus.test: ZeroDivisionError: division by zero"


def test_plain_lines_off_the_journal():
    with tempfile.TemporaryDirectory(prefix="aus-test-log-") as d:
        tmp = Path(d)
        path = tmp / "journal.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
            rx.bind(str(path))
            for stream in (None, "other"):   # unset, or stderr is not that stream
                stderr = run(tmp, stream=stream, sock=path)
                lines = stderr.splitlines()
                assert lines[:3] == ["DEBUG aus.test: debug line", "INFO aus.test: info line",
                                     "WARNING aus.test: warning line"], stream
                assert "ERROR aus.test: it failed" in lines
                assert not any(line.startswith("<") for line in lines)
            assert receive(rx) == []


def test_ausd_configuration_error_is_an_error_entry():
    """A bad ausd.yaml stops ausd before its logging setup (the file holds
    the level); under systemd each line of the error still has priority 3."""
    with tempfile.TemporaryDirectory(prefix="aus-test-log-") as d:
        tmp = Path(d)
        cfg = tmp / "ausd.yaml"
        cfg.write_text("log_level: info\nmetrics_listen: 10.1.2.3:9477\n")
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        env["PYTHONPATH"] = f"{ROOT / 'daemon'}:{ROOT}"
        for journal_stream in (True, False):
            err = tmp / f"stderr-{journal_stream}"
            with open(err, "wb") as f:
                st = os.fstat(f.fileno())
                if journal_stream:
                    env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
                p = subprocess.run([sys.executable, "-m", "aus.agent.ausd", "--config",
                                    str(cfg)], stderr=f, env=env, timeout=60)
            assert p.returncode == 2
            lines = err.read_text().splitlines()
            prefix = "<3>" if journal_stream else ""
            assert lines[0] == f"{prefix}ausd: {cfg}: invalid configuration:"
            assert lines[1].startswith(f"{prefix}  line 2: metrics_listen: 10.1.2.3 is not a "
                                       "loopback address")
            env.pop("JOURNAL_STREAM", None)
