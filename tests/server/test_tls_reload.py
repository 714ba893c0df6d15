"""SIGHUP makes a serving aus-server re-read its TLS certificate and key:
new connections get the new certificate without a restart; a pair that
does not load is refused with a log line saying why, and the one served
before stays (and still completes handshakes)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess

import pytest

from tests.support.names import free_port
from tests.support.polling import wait_until
from tests.support.server_process import CLI, output_of, serving, wait_port


def make_pair(directory, name: str) -> tuple[str, str]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}"], check=True, capture_output=True)
    return str(cert), str(key)


def der(cert: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(open(cert).read())


def served(port: int) -> bytes:
    """The certificate a new connection to the server gets."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), 5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.getpeercert(binary_form=True)


def install(src: tuple[str, str], dst: tuple[str, str]) -> None:
    """What a renewal does: the new files in place of the old (renamed in,
    so the server never reads one half-written)."""
    for s, d in zip(src, dst):
        shutil.copyfile(s, d + ".new")
        os.replace(d + ".new", d)


@pytest.fixture
def pairs(tmp_path):
    return make_pair(tmp_path, "a"), make_pair(tmp_path, "b"), make_pair(tmp_path, "c")


def test_sighup_serves_the_new_certificate_and_refuses_a_broken_one(tmp_path, pairs):
    a, b, c = pairs
    live = (str(tmp_path / "server.crt"), str(tmp_path / "server.key"))
    install(a, live)
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", f"sqlite:///{tmp_path}/s.db",
                 "--tls-cert", live[0], "--tls-key", live[1]) as proc:
        wait_port(port, proc)
        assert served(port) == der(a[0])
        held = socket.create_connection(("127.0.0.1", port), 5)   # open across the reloads

        install(b, live)
        assert served(port) == der(a[0]), "replaced before any SIGHUP"
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: served(port) == der(b[0]), timeout=10, what="certificate B served")
        wait_until(lambda: "SIGHUP: TLS certificate re-read from" in output_of(proc), timeout=5,
                   what="the reload logged")

        # A certificate file that is not PEM: refused, B still served.
        with open(live[0], "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: output_of(proc).count("not replaced") == 1, timeout=10,
                   what="the refusal logged")
        log = output_of(proc)
        assert f"still serving the previous one: the TLS certificate {live[0]}" in log, log
        assert served(port) == der(b[0])

        # C's certificate with B's key: OpenSSL would take the certificate
        # and then refuse the key; the live context must not keep half of it.
        shutil.copyfile(c[0], live[0])
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: output_of(proc).count("not replaced") == 2, timeout=10,
                   what="the second refusal logged")
        assert "KEY_VALUES_MISMATCH" in output_of(proc) or "mismatch" in output_of(proc).lower()
        assert served(port) == der(b[0])

        # An unreadable key: refused, naming the file.
        os.unlink(live[1])
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: output_of(proc).count("not replaced") == 3, timeout=10,
                   what="the third refusal logged")
        assert f"cannot read the TLS key {live[1]}: No such file or directory" in output_of(proc)
        assert served(port) == der(b[0])

        # The connection opened before any reload was served all along.
        assert proc.poll() is None
        held.close()


def test_sighup_on_plain_http_is_logged_not_fatal(tmp_path):
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", f"sqlite:///{tmp_path}/s.db") as proc:
        wait_port(port, proc)
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: "no TLS certificate to re-read" in output_of(proc), timeout=10,
                   what="the SIGHUP logged")
        with socket.create_connection(("127.0.0.1", port), 5):
            pass
        assert proc.poll() is None


def test_a_pair_that_does_not_load_is_named_before_anything_listens(tmp_path, pairs):
    a, b, _ = pairs
    p = subprocess.run(CLI + ["serve", "--listen", f"127.0.0.1:{free_port()}", "--db",
                              f"sqlite:///{tmp_path}/s.db", "--tls-cert", a[0], "--tls-key", b[1]],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert f"aus-server: the TLS certificate {a[0]} and key {b[1]} do not load" in p.stderr, p.stderr
    encrypted = str(tmp_path / "encrypted.key")
    subprocess.run(["openssl", "pkey", "-in", a[1], "-out", encrypted, "-aes256", "-passout",
                    "pass:secret"], check=True, capture_output=True)
    p = subprocess.run(CLI + ["serve", "--listen", f"127.0.0.1:{free_port()}", "--db",
                              f"sqlite:///{tmp_path}/s.db", "--tls-cert", a[0], "--tls-key", encrypted],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1
    assert f"the TLS key {encrypted} is encrypted" in p.stderr, p.stderr


def test_several_workers_are_replaced_only_for_a_pair_that_loads(tmp_path, pairs, postgres):
    a, b, c = pairs
    live = (str(tmp_path / "server.crt"), str(tmp_path / "server.key"))
    install(a, live)
    port = free_port()
    db = postgres.new_database()
    try:
        with serving("--listen", f"127.0.0.1:{port}", "--db", postgres.url(db), "--workers", "2",
                     "--tls-cert", live[0], "--tls-key", live[1]) as proc:
            wait_port(port, proc)
            wait_until(lambda: served(port) == der(a[0]), timeout=30, what="certificate A")

            # A mismatched pair: refused by the supervisor, no worker replaced.
            shutil.copyfile(c[0], live[0])
            os.kill(proc.pid, signal.SIGHUP)
            wait_until(lambda: "not replaced" in output_of(proc), timeout=10, what="the refusal")
            assert "replacing the workers" not in output_of(proc)
            assert {served(port) for _ in range(8)} == {der(a[0])}

            install(b, live)
            os.kill(proc.pid, signal.SIGHUP)
            wait_until(lambda: "replacing the workers" in output_of(proc), timeout=10,
                       what="the reload logged")
            # Every worker replaced: several new connections in a row all get B.
            wait_until(lambda: {served(port) for _ in range(8)} == {der(b[0])}, timeout=90,
                       interval=0.5, what="certificate B from every worker")
            assert proc.poll() is None
    finally:
        postgres.drop_database(db)
