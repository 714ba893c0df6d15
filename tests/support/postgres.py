"""A throwaway PostgreSQL server for tests and benchmarks: its own data directory, port
and socket directory, started and removed by whoever uses it, so the
machine's own clusters are never touched."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

from .names import free_port


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (scripts/server-packages.sh installs it)")
    return os.path.dirname(found[-1])


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = tempfile.mkdtemp(prefix="aus-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _as_user(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:
            argv = ["runuser", "-u", self.user, "--"] + argv
        return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            shutil.chown(self.root, self.user)
        self._as_user([f"{self.bindir}/initdb", "-D", self.data, "-A", "trust", "-U", "aus",
                       "--no-sync", "-E", "UTF8"])
        return self.resume()

    def halt(self) -> None:
        """Stop the server and keep its data: :meth:`resume` brings it back.
        A fast shutdown: it disconnects the clients, as an outage would."""
        if self.proc is not None and self.proc.poll() is None:
            # pg_ctl signals postgres itself (runuser passes on SIGTERM only).
            self._as_user([f"{self.bindir}/pg_ctl", "stop", "-D", self.data, "-m", "fast",
                           "-w", "-t", "30"])
            self.proc.wait(30)

    def resume(self) -> "PostgresServer":
        """Run the server on its data directory and wait until it answers."""
        argv = [f"{self.bindir}/postgres", "-D", self.data, "-p", str(self.port),
                "-k", self.root, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                "-c", "max_connections=300", "-c", "shared_buffers=128MB"]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", self.user, "--"] + argv
        # The server's log goes to a file: a pipe nobody reads fills up with
        # the errors tests provoke, and then every backend blocks writing it.
        self.log = os.path.join(self.root, "postgres.log")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log, "rb") as log:
                    raise RuntimeError("postgres exited: " + log.read().decode()[-2000:])
            # Listening comes before accepting queries (recovery, start-up):
            # wait for an answer, not just a connection.
            with contextlib.suppress(OSError, subprocess.CalledProcessError):
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                self.psql("SELECT 1")
                return self
            time.sleep(0.1)
        raise RuntimeError("postgres did not start within 30 s")

    def url(self, db: str) -> str:
        return f"postgresql://aus@127.0.0.1:{self.port}/{db}"

    def psql(self, sql: str) -> None:
        subprocess.run([f"{self.bindir}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "aus",
                        "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql],
                       check=True, capture_output=True, text=True)

    def new_database(self) -> str:
        name = "aus_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()   # smart shutdown of the server we started
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
