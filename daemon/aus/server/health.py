"""``GET /healthz`` and ``GET /readyz``, for load balancers, orchestrators
and service managers. Neither needs a key, and neither says anything about
an org.

- ``/healthz``: the process answers HTTP (liveness). Touches nothing else,
  so a database outage never gets a healthy server restarted.
- ``/readyz``: this replica can do its work: the database answers
  ``SELECT 1`` within :data:`DB_TIMEOUT` seconds and the bundle service
  (which builds bundles and wakes long-polls) is running. 200 when both
  hold, else 503; the body names each check and why it failed::

      {"status": "unavailable", "checks": {"database": {"ok": false, "error": "..."},
                                           "bundle_service": {"ok": true}}}

Concurrent probes share one database query, so a flood of probes against
an unreachable database holds one connection attempt, not one each.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

DB_TIMEOUT = 2.0   # seconds; a probe answers within this, and the timeout is the answer


def _select_one(engine: Engine) -> None:
    # read_only: SQLite's BEGIN then takes no write lock, so a probe never
    # queues behind a writer.
    for attempt in (1, 2):
        try:
            with engine.connect().execution_options(read_only=True) as conn:
                conn.execute(text("SELECT 1")).scalar_one()
            return
        except DBAPIError as exc:
            # After a database restart the pooled connections are dead; the
            # first use invalidates them all, and a fresh one says the truth.
            if attempt == 2 or not exc.connection_invalidated:
                raise


def _reason(exc: BaseException) -> str:
    first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else 'no detail'}"


class Readiness:
    def __init__(self, engine: Engine, bundles, timeout: float = DB_TIMEOUT):  # noqa: ANN001
        self.engine = engine
        self.bundles = bundles
        self.timeout = timeout
        self._query: asyncio.Future | None = None
        self._query_started = 0.0
        self._was_ready = True

    def log_change(self, ok: bool, checks: dict) -> None:
        """One line when readiness changes, not one per probe."""
        if ok != self._was_ready:
            if ok:
                log.info("ready again")
            else:
                log.warning("not ready: %s", ", ".join(
                    f"{name} ({c['error']})" for name, c in checks.items() if not c["ok"]))
        self._was_ready = ok

    async def database(self) -> dict:
        """Whether SELECT 1 answers in time. A query still running (from
        an earlier probe, or one that hangs on an unreachable host) is
        waited on, never doubled: probes cannot pile up threads."""
        loop = asyncio.get_running_loop()
        if self._query is None or self._query.done():
            self._query = loop.run_in_executor(None, _select_one, self.engine)
            # Its error is read here even when every probe stopped waiting.
            self._query.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._query_started = loop.time()
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(self._query)
        except TimeoutError:
            waited = loop.time() - self._query_started
            return {"ok": False, "error": f"no answer to SELECT 1 for {waited:.1f} s"}
        except Exception as exc:   # any driver or pool error is "not ready"
            return {"ok": False, "error": _reason(exc)}
        return {"ok": True}

    def bundle_service(self) -> dict:
        if self.bundles.running():
            return {"ok": True}
        return {"ok": False, "error": "the bundle service is not running"}

    async def report(self) -> tuple[bool, dict]:
        checks = {"database": await self.database(), "bundle_service": self.bundle_service()}
        return all(c["ok"] for c in checks.values()), checks


def install(app: FastAPI) -> None:
    readiness = Readiness(app.state.engine, app.state.bundles)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(_request: Request) -> JSONResponse:
        ok, checks = await readiness.report()
        readiness.log_change(ok, checks)
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                            status_code=200 if ok else 503)
