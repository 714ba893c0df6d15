"""`aus-server` run as an operator runs it: a real process on loopback,
its whole process group stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

CLI = [sys.executable, "-m", "aus.server.cli"]


@contextlib.contextmanager
def serving(*args: str):
    """`aus-server serve ARGS` in a session of its own; stopped with its
    workers (SIGTERM, then SIGKILL after 15 s)."""
    # Its output goes to a file: a pipe nobody reads would fill up with the
    # server's log and then stop the server mid-test.
    output = tempfile.TemporaryFile()
    proc = subprocess.Popen(CLI + ["serve", *args], stdout=output, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.output = output
    try:
        yield proc
    finally:
        output.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)   # the server and its workers, which we started
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def output_of(proc: subprocess.Popen) -> str:
    """What a server started by :func:`serving` has written so far."""
    proc.output.seek(0)
    return proc.output.read().decode(errors="replace")[-4000:]


def wait_port(port: int, proc: subprocess.Popen) -> None:
    """Until the server started as ``proc`` accepts on 127.0.0.1:``port``;
    its output if it exits first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, output_of(proc)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise AssertionError("aus-server did not listen within 30 s")
