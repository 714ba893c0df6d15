"""uvicorn run with SIGHUP meaning "re-read the TLS certificate and key"
(``systemctl reload aus-server``), never "exit".

One worker: the server's event loop reloads the pair into the SSL context
uvicorn serves with (:func:`.tls.reload`): new connections get the new
certificate, established ones and long-polls go on undisturbed.

Several workers: each has its own context, so the supervisor checks the
pair first and, only if it loads, has uvicorn replace the workers one by
one (each replacement serving before the worker it replaces stops). A
pair that does not load is refused with one log line and nothing restarts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvicorn
from uvicorn.supervisors import Multiprocess

from . import tls

log = logging.getLogger("aus.server.tls")
REPLACEMENT_SECONDS = 60     # for a new worker to be serving before the old one stops


def _refused(exc: tls.TlsError) -> None:
    log.error("SIGHUP: TLS certificate not replaced, still serving the previous one: %s", exc)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, files: tls.TlsFiles | None):
        super().__init__(config)
        self.files = files

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Handled in the loop: the handler runs between requests, never
        # inside one, and the context is only touched from this thread.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_tls)
        await super().startup(sockets)

    def reload_tls(self) -> None:
        if self.files is None or self.config.ssl is None:
            log.info("SIGHUP: serving plain HTTP, no TLS certificate to re-read")
            return
        try:
            pair = tls.reload(self.config.ssl, self.files)
        except tls.TlsError as exc:
            _refused(exc)
            return
        log.info("SIGHUP: TLS certificate re-read from %s; new connections get SHA-256 %s",
                 self.files.cert, pair.fingerprint)


class _Supervisor(Multiprocess):
    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket],
                 files: tls.TlsFiles | None):
        super().__init__(config, sockets=sockets)
        self.files = files

    def handle_hup(self) -> None:
        if self.files is None:
            log.info("SIGHUP: serving plain HTTP, no TLS certificate to re-read")
            return
        try:
            pair = tls.check(self.files)
        except tls.TlsError as exc:
            _refused(exc)
            return
        log.info("SIGHUP: TLS certificate %s (SHA-256 %s) loads; replacing the workers",
                 self.files.cert, pair.fingerprint)
        # uvicorn gives a replacement its liveness timeout (5 s) to be ready,
        # then abandons the replacement; a worker opens the database and
        # checks its schema first, which a busy host can take longer for.
        patience = self.config.timeout_worker_healthcheck
        self.config.timeout_worker_healthcheck = max(patience, REPLACEMENT_SECONDS)
        try:
            super().handle_hup()
        finally:
            self.config.timeout_worker_healthcheck = patience


def hold_sighup() -> None:
    """Until the server's loop (or the supervisor) handles it, SIGHUP is
    ignored, not fatal: a reload while the server starts (imports, schema
    migration) changes nothing. Ignored signals stay ignored in workers."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def run(config: uvicorn.Config, files: tls.TlsFiles | None,
        sockets: list[socket.socket] | None = None) -> None:
    """Serve until SIGTERM or SIGINT; ``sockets`` (shared listening
    sockets) when ``config.workers`` > 1. Call :func:`hold_sighup` first."""
    if config.workers > 1:
        _Supervisor(config, sockets or [], files).run()
    else:
        _Server(config, files).run()
