"""``aus-server``: serve, or manage API keys.

    aus-server serve [--listen HOST:PORT] [--db URL] [--tls-cert PEM --tls-key PEM]
                     [--workers N] [--flow-retention-days N] [--metrics-token-file PATH]
    aus-server api-key create --org N [--scope S]... [--label TEXT] [--db URL]
                                                   prints <key>:<secret> once
    aus-server api-key list --org N [--json] [--db URL]
    aus-server api-key revoke [--org N] KEY_ID [--db URL]
    aus-server migrate [--db URL]

The database URL defaults to $AUS_SERVER_DB, else SQLite in /var/lib/aus-server/.
SIGHUP makes a serving aus-server re-read its TLS certificate and key.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys

from ..core.errors import AusError
from ..logs import setup as logsetup
from . import scopes
from .db import DEFAULT_DB, open_database
from .flowstore import DEFAULT_RETENTION_DAYS

DEFAULT_LISTEN = "127.0.0.1:8443"


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 0.0.0.0:8443")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _days(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 3650:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of days from 1 to 3650")
    return int(text)


def _label(text: str) -> str:
    if len(text) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: a label is at most 200 characters, "
                                         f"without control characters")
    return text.strip()


def _org(text: str) -> str:
    org = text.strip()
    if not org or "/" in org:
        raise argparse.ArgumentTypeError(f"{text!r} is not an org id")
    return org


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _listening_socket(host: str, port: int) -> socket.socket:
    """The socket the workers share. Made with IPPROTO_TCP explicitly:
    asyncio sets TCP_NODELAY on accepted connections only when the
    listening socket says TCP, and without it every keep-alive response
    waits ~40 ms for delayed ACKs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AusError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from . import serving
    from .metrics import multiprocess_dir

    serving.hold_sighup()

    host, port = args.listen
    if bool(args.tls_cert) != bool(args.tls_key):
        print("aus-server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if not args.tls_cert and not _is_loopback(host):
        # Entra ID only talks HTTPS, and the API key must not cross a network in clear.
        print(f"aus-server: plain HTTP is served on loopback only; give --tls-cert and "
              f"--tls-key to listen on {host}", file=sys.stderr)
        return 2
    files = None
    if args.tls_cert:
        from .tls import TlsFiles, check

        files = TlsFiles(args.tls_cert, args.tls_key)
        check(files)     # a bad pair is named here, before anything listens
    url = args.db or os.environ.get("AUS_SERVER_DB") or DEFAULT_DB
    if args.workers > 1 and url.startswith("sqlite"):
        # SQLite has one writer at a time; across processes its lock is
        # polled, and one process's queued writers can starve the other's
        # past any timeout. Replicas need PostgreSQL.
        print("aus-server: SQLite serves one worker; use --db postgresql://... for several",
              file=sys.stderr)
        return 2
    if args.db:
        os.environ["AUS_SERVER_DB"] = args.db
    os.environ["AUS_FLOW_RETENTION_DAYS"] = str(args.flow_retention_days)
    if args.metrics_token_file:
        try:
            with open(args.metrics_token_file) as f:
                empty = not f.read().strip()
            if empty:
                raise AusError(f"metrics token file {args.metrics_token_file} is empty")
        except OSError as exc:
            raise AusError(f"metrics token file {args.metrics_token_file}: {exc.strerror}") from exc
        os.environ["AUS_METRICS_TOKEN_FILE"] = os.path.abspath(args.metrics_token_file)
    # Migrate once here, so worker processes start on an up-to-date schema
    # and a bad URL is reported before anything listens.
    engine, _ = open_database(args.db)
    engine.dispose()
    # Several workers are several replicas on one database: each keeps its
    # long-pollers current from the shared bundles table.
    config = uvicorn.Config("aus.server.app:app_from_env", factory=True, host=host, port=port,
                            workers=args.workers, ssl_certfile=args.tls_cert,
                            ssl_keyfile=args.tls_key, log_level=args.log_level.lower(),
                            access_log=args.access_log, timeout_keep_alive=75, backlog=4096,
                            log_config=None)   # uvicorn's loggers go through logsetup's
    sockets = [_listening_socket(host, port)] if config.workers > 1 else None
    with multiprocess_dir(config.workers):
        serving.run(config, files, sockets)   # SIGHUP re-reads the TLS certificate and key
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aus-server", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    db_help = f"database URL (sqlite:///PATH or postgresql://...; default $AUS_SERVER_DB or {DEFAULT_DB})"

    s = sub.add_parser("serve", help="serve SCIM, the management API, bundles and the console")
    s.add_argument("--listen", type=_listen, default=_listen(DEFAULT_LISTEN),
                   help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    s.add_argument("--db", help=db_help)
    s.add_argument("--tls-cert", help="PEM certificate (chain); serve HTTPS")
    s.add_argument("--tls-key", help="PEM private key")
    s.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    s.add_argument("--flow-retention-days", type=_days, default=DEFAULT_RETENTION_DAYS,
                   help=f"days of flow records kept (default {DEFAULT_RETENTION_DAYS}; "
                        f"whole UTC days are removed, so up to one more is kept)")
    s.add_argument("--metrics-token-file",
                   help="file holding a token /metrics then requires as 'Authorization: Bearer "
                        "<token>' (default: /metrics needs none, like /healthz)")
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--access-log", action="store_true", help="log every request")

    k = sub.add_parser("api-key", help="create, list or revoke API keys")
    ksub = k.add_subparsers(dest="keycmd", required=True)
    kc = ksub.add_parser("create", help="create a key for an org; prints <key>:<secret> once")
    kc.add_argument("--org", required=True, type=_org)
    kc.add_argument("--scope", action="append", choices=scopes.ALL, dest="scopes",
                    help="what the key may do (repeat for several; default admin): scim for "
                         "Entra ID, workload for ausd, read for read-only use, admin for all")
    kc.add_argument("--label", type=_label, default="", help="what the key is for (listed, audited)")
    kc.add_argument("--db", help=db_help)
    kl = ksub.add_parser("list", help="list an org's keys (never their secrets)")
    kl.add_argument("--org", required=True, type=_org)
    kl.add_argument("--json", action="store_true", help="one JSON document")
    kl.add_argument("--db", help=db_help)
    kr = ksub.add_parser("revoke", help="revoke a key; refused from then on")
    kr.add_argument("--org", type=_org, help="the org the key must belong to")
    kr.add_argument("key_id")
    kr.add_argument("--db", help=db_help)

    m = sub.add_parser("migrate", help="bring the database schema up to date")
    m.add_argument("--db", help=db_help)

    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logsetup.setup(getattr(args, "log_level", "INFO"), "aus-server",
                   plain_format=logsetup.TIMED_FORMAT)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.cmd == "serve":
            return serve(args)
        from .auth import create_key, list_keys, revoke_key

        engine, sessions = open_database(args.db)
        try:
            if args.cmd == "migrate":
                print("aus-server: schema up to date")
            elif args.keycmd == "create":
                print(create_key(sessions, args.org, args.scopes or scopes.DEFAULT, args.label))
            elif args.keycmd == "list":
                _print_keys(list_keys(sessions, args.org), args.json)
            else:
                if not revoke_key(sessions, args.key_id, args.org):
                    where = f" in org {args.org!r}" if args.org else ""
                    print(f"aus-server: no API key {args.key_id!r}{where}", file=sys.stderr)
                    return 1
                print(f"revoked {args.key_id}")
        finally:
            engine.dispose()
        return 0
    except AusError as exc:
        print(f"aus-server: {exc}", file=sys.stderr)
        return 1


def _print_keys(keys: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"items": keys}, indent=2))
        return
    rows = [("ID", "LABEL", "SCOPES", "CREATED", "REVOKED")]
    for k in keys:
        rows.append((k["id"], k["label"] or "-", ",".join(k["scopes"]),
                     k["created_at"] or "-", k["revoked_at"] or ("yes" if k["revoked"] else "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
