"""Fixtures for aus-server tests: every test gets an empty database, once
on SQLite and once on a real PostgreSQL started for the session, and an
in-process client with an API key of org "1"."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from aus.server.app import create_app
from aus.server.auth import create_key
from aus.server.db import open_database
from tests.support.postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres():
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/aus-server.db"
        return
    pg: PostgresServer = request.getfixturevalue("postgres")
    name = pg.new_database()
    try:
        yield pg.url(name)
    finally:
        pg.drop_database(name)


@dataclasses.dataclass
class Server:
    client: TestClient
    db_url: str
    org: str
    token: str          # "<key>:<secret>" of org `org`
    other_token: str    # a key of org "2"

    @property
    def scim(self) -> str:
        return f"/scim/orgs/{self.org}"

    @property
    def api(self) -> str:
        return f"/api/orgs/{self.org}"

    def bearer(self, token: str | None = None) -> dict:
        return {"Authorization": f"Bearer {token or self.token}"}

    def basic(self, token: str | None = None) -> tuple[str, str]:
        key, _, secret = (token or self.token).partition(":")
        return key, secret


@pytest.fixture
def server(db_url):
    _engine, sessions = open_database(db_url)
    token = create_key(sessions, "1")
    other = create_key(sessions, "2")
    _engine.dispose()
    app = create_app(db_url, bundle_interval=0.05, max_wait=5)
    with TestClient(app) as client:
        yield Server(client=client, db_url=db_url, org="1", token=token, other_token=other)
