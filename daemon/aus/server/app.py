"""The ASGI application: SCIM under ``/scim/orgs/{org_id}/``, the
management API under ``/api/orgs/{org_id}/``, the console under ``/``."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI

from .auth import Verifier
from .bundle import BundleService
from .db import open_database
from .intake import InputGate

log = logging.getLogger("aus.server")


def create_app(db_url: str | None = None, *, bundle_interval: float = 0.1,
               max_wait: float = 60.0) -> FastAPI:
    engine, sessions = open_database(db_url)
    bundles = BundleService(sessions, interval=bundle_interval, max_wait=max_wait)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await bundles.start()
        try:
            yield
        finally:
            await bundles.stop()
            engine.dispose()

    app = FastAPI(title="aus-server", version="0.1.0", lifespan=lifespan,
                  docs_url=None, openapi_url="/api/openapi.json", redoc_url=None)
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.verifier = Verifier(sessions)
    app.state.bundles = bundles

    from . import api, apidocs, console, traffic
    from .scim import routes as scim_routes

    scim_routes.install(app)
    api.install(app)
    traffic.install(app)
    console.install(app)
    apidocs.install(app)
    app.add_middleware(InputGate)       # outermost: before any route reads a byte
    return app


def app_from_env() -> FastAPI:
    """Factory for ``aus-server serve``'s workers: the database URL comes
    from AUS_SERVER_DB (set by the CLI)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return create_app(None)
