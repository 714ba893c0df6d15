"""`aus-server` as an operator runs it: api-key create prints a token once
and stores only a hash; serve speaks HTTPS with the given certificate and
refuses plain HTTP off loopback."""

from __future__ import annotations

import sqlite3
import ssl
import subprocess
import urllib.error
import urllib.request
from base64 import b64encode

from tests.support.names import free_port
from tests.support.server_process import CLI, serving, wait_port


def test_api_key_create_prints_once_and_stores_a_salted_hash(tmp_path):
    db = f"sqlite:///{tmp_path}/s.db"
    tokens = [subprocess.run(CLI + ["api-key", "create", "--org", "7", "--db", db], check=True,
                             capture_output=True, text=True).stdout.strip() for _ in range(2)]
    assert all(t.count(":") == 1 for t in tokens) and tokens[0] != tokens[1]
    rows = sqlite3.connect(f"{tmp_path}/s.db").execute(
        "select id, org_id, salt, secret_hash from api_keys").fetchall()
    assert len(rows) == 2 and {r[1] for r in rows} == {"7"}
    secrets_ = [t.split(":")[1] for t in tokens]
    for _id, _org, salt, digest in rows:
        assert len(salt) == 16 and all(s.encode() not in digest for s in secrets_)
    assert rows[0][2] != rows[1][2]   # salted per key
    key_id = tokens[0].split(":")[0]
    out = subprocess.run(CLI + ["api-key", "revoke", key_id, "--db", db], capture_output=True, text=True)
    assert out.returncode == 0 and key_id in out.stdout
    bad = subprocess.run(CLI + ["api-key", "revoke", "aknothere", "--db", db], capture_output=True, text=True)
    assert bad.returncode == 1 and "no API key" in bad.stderr


def test_bad_database_url_is_reported(tmp_path):
    p = subprocess.run(CLI + ["api-key", "create", "--org", "1", "--db",
                              "postgresql://nobody:secretpw@127.0.0.1:1/none"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "database postgresql://nobody:***@127.0.0.1:1/none" in p.stderr
    assert "secretpw" not in p.stderr


def test_plain_http_only_on_loopback(tmp_path):
    p = subprocess.run(CLI + ["serve", "--listen", "0.0.0.0:18999", "--db", f"sqlite:///{tmp_path}/s.db"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--tls-cert" in p.stderr
    p = subprocess.run(CLI + ["serve", "--listen", "nonsense"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "HOST:PORT" in p.stderr
    p = subprocess.run(CLI + ["serve", "--db", f"sqlite:///{tmp_path}/s.db", "--workers", "2"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "postgresql://" in p.stderr


def test_serves_https_with_the_given_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=aus-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    db = f"sqlite:///{tmp_path}/s.db"
    token = subprocess.run(CLI + ["api-key", "create", "--org", "1", "--db", db], check=True,
                           capture_output=True, text=True).stdout.strip()
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", db, "--tls-cert", str(cert),
                 "--tls-key", str(key)) as proc:
        wait_port(port, proc)
        ctx = ssl.create_default_context(cafile=str(cert))
        req = urllib.request.Request(f"https://127.0.0.1:{port}/api/whoami",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            assert resp.status == 200 and b'"org":"1"' in resp.read()
        req = urllib.request.Request(f"https://127.0.0.1:{port}/api/orgs/1/policy", headers={
            "Authorization": "Basic " + b64encode(token.encode()).decode()})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            assert resp.status == 200
        # Without trusting the certificate, the client refuses: it is really TLS.
        try:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/api/whoami", timeout=10)
        except urllib.error.URLError as exc:
            assert isinstance(exc.reason, ssl.SSLCertVerificationError), exc
        else:
            raise AssertionError("an untrusted certificate was accepted")
