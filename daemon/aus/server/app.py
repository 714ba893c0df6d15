"""The ASGI application: SCIM under ``/scim/orgs/{org_id}/``, the
management API under ``/api/orgs/{org_id}/``, the console under ``/``."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from fastapi import FastAPI

from ..logs import setup as logsetup
from . import health, metrics
from .auth import Verifier
from .bundle import BundleService
from .db import open_database
from .flowstore import (
    DEFAULT_RETENTION_DAYS,
    RETENTION_INTERVAL,
    FlowStore,
    RetentionService,
)
from .intake import InputGate

log = logging.getLogger("aus.server")


def create_app(db_url: str | None = None, *, bundle_interval: float = 0.1,
               max_wait: float = 60.0, flow_retention_days: int = DEFAULT_RETENTION_DAYS,
               retention_interval: float = RETENTION_INTERVAL,
               metrics_token: str | None = None) -> FastAPI:
    engine, sessions = open_database(db_url)
    bundles = BundleService(sessions, interval=bundle_interval, max_wait=max_wait)
    flows = FlowStore(engine, flow_retention_days)
    retention = RetentionService(flows, interval=retention_interval)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await bundles.start()
        await retention.start()
        try:
            yield
        finally:
            await retention.stop()
            await bundles.stop()
            engine.dispose()

    app = FastAPI(title="aus-server", version="0.1.0", lifespan=lifespan,
                  docs_url=None, openapi_url="/api/openapi.json", redoc_url=None)
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.verifier = Verifier(sessions)
    app.state.bundles = bundles
    app.state.flows = flows

    from . import api, apidocs, auditapi, console, policyapi, traffic
    from . import flows as flow_routes
    from .scim import routes as scim_routes

    scim_routes.install(app)
    api.install(app)
    policyapi.install(app)
    flow_routes.install(app)
    traffic.install(app)
    auditapi.install(app)
    console.install(app)
    apidocs.install(app)
    health.install(app)
    app.add_middleware(InputGate)       # before any route reads a byte
    metrics.install(app, metrics_token)  # outermost: counts the gate's refusals too
    return app


def app_from_env() -> FastAPI:
    """Factory for ``aus-server serve``'s workers: the database URL comes
    from AUS_SERVER_DB, the flow retention from AUS_FLOW_RETENTION_DAYS,
    the metrics token from the file AUS_METRICS_TOKEN_FILE names (all set
    by the CLI)."""
    if not logging.getLogger().handlers:    # a worker process: the CLI's setup is not here
        logsetup.setup(logging.INFO, "aus-server", plain_format=logsetup.TIMED_FORMAT)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    days = int(os.environ.get("AUS_FLOW_RETENTION_DAYS") or DEFAULT_RETENTION_DAYS)
    token_file = os.environ.get("AUS_METRICS_TOKEN_FILE")
    token = Path(token_file).read_text().strip() if token_file else None
    return create_app(None, flow_retention_days=days, metrics_token=token)
