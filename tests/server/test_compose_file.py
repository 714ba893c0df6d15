"""packaging/server/compose.yaml as Docker Compose reads it
(`docker-compose config`, which validates it against the Compose schema):
aus-server built from packaging/server/Containerfile, on PostgreSQL, each
with a healthcheck, aus-server started once PostgreSQL is healthy, no
password in the file. The Containerfile runs aus-server as a user that is
not root."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "packaging/server/compose.yaml"
CONTAINERFILE = REPO / "packaging/server/Containerfile"


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is missing (scripts/server-packages.sh installs it)"
    clean = {k: v for k, v in os.environ.items() if k != "AUS_DB_PASSWORD"}
    return subprocess.run([tool, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                          timeout=60, env={**clean, **env}, cwd=COMPOSE.parent)


def test_compose_validates_and_wires_server_and_database():
    p = compose_config({"AUS_DB_PASSWORD": "pw-from-env"})
    assert p.returncode == 0, p.stderr
    services = yaml.safe_load(p.stdout)["services"]
    assert set(services) == {"aus-server", "postgres"}
    server, db = services["aus-server"], services["postgres"]
    assert Path(server["build"]["context"]) == REPO
    assert server["build"]["dockerfile"] == "packaging/server/Containerfile"
    assert server["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert server["environment"]["AUS_SERVER_DB"] == "postgresql://aus:pw-from-env@postgres/aus"
    assert db["environment"]["POSTGRES_PASSWORD"] == "pw-from-env"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert "https://127.0.0.1:8443/healthz" in " ".join(server["healthcheck"]["test"])
    assert server["cap_drop"] == ["ALL"] and server["read_only"] is True
    # the command is `aus-server serve` with TLS (any address but loopback needs it)
    command = server["command"]
    assert command[0] == "serve" and "--tls-cert" in command and "--tls-key" in command


def test_compose_refuses_to_run_without_a_database_password():
    p = compose_config({})
    assert p.returncode != 0
    assert "AUS_DB_PASSWORD" in p.stderr


def test_the_image_runs_aus_server_unprivileged_from_this_repository():
    text = CONTAINERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f == "debian:12-slim" for f in froms), froms
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert '"/src[server]"' in text
    for source in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), path
    assert re.search(r'^ENTRYPOINT \["aus-server"\]', text, re.M)
