"""Stores at an older schema, for the tests of each migration: made with
the server's own Alembic scripts, moved up or down one revision at a time."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

import aus.server.db as db


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(db.Path(db.__file__).parent / "migrations"))
    return cfg


def migrate(engine: Engine, revision: str, *, down: bool = False) -> None:
    """Bring ``engine``'s schema up (or down) to ``revision``."""
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def store_at(url: str, revision: str) -> Engine:
    """A new store at ``url`` with the schema of ``revision``."""
    engine = create_engine(url)
    migrate(engine, revision)
    return engine
