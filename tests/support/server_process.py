"""`aus-server` run as an operator runs it: a real process on loopback,
its whole process group stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "aus.server.cli"]


@contextlib.contextmanager
def serving(*args: str):
    """`aus-server serve ARGS` in a session of its own; stopped with its
    workers (SIGTERM, then SIGKILL after 15 s)."""
    proc = subprocess.Popen(CLI + ["serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)   # the server and its workers, which we started
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_port(port: int, proc: subprocess.Popen) -> None:
    """Until the server started as ``proc`` accepts on 127.0.0.1:``port``;
    its output if it exits first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise AssertionError("aus-server did not listen within 30 s")
