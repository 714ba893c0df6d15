"""Alembic environment: migrations run on the connection handed over by
:func:`aus.server.db.migrate` (or, for ``alembic revision``, on the URL in
the AUS_SERVER_DB environment variable)."""

import os

from alembic import context
from sqlalchemy import create_engine

from aus.server.db import Base

target_metadata = Base.metadata
conn = context.config.attributes.get("connection")


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if conn is not None:
    run(conn)
else:
    with create_engine(os.environ["AUS_SERVER_DB"]).connect() as c:
        run(c)
        c.commit()
