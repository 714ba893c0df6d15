"""``aus-server``: serve, or manage API keys.

    aus-server serve [--listen HOST:PORT] [--db URL] [--tls-cert PEM --tls-key PEM]
                     [--workers N] [--flow-retention-days N] [--metrics-token-file PATH]
    aus-server api-key create --org N [--db URL]     prints <key>:<secret> once
    aus-server api-key revoke KEY_ID [--db URL]
    aus-server migrate [--db URL]

The database URL defaults to $AUS_SERVER_DB, else SQLite in /var/lib/aus/.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys

from ..core.errors import AusError
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

    host, port = args.listen
    if bool(args.tls_cert) != bool(args.tls_key):
        print("aus-server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if not args.tls_cert and not _is_loopback(host):
        # Entra ID only talks HTTPS, and the API key must not cross a network in clear.
        print(f"aus-server: plain HTTP is served on loopback only; give --tls-cert and "
              f"--tls-key to listen on {host}", file=sys.stderr)
        return 2
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
                            access_log=args.access_log, timeout_keep_alive=75, backlog=4096)
    from .metrics import multiprocess_dir

    with multiprocess_dir(config.workers):
        if config.workers > 1:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[_listening_socket(host, port)]).run()
        else:
            uvicorn.Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
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

    k = sub.add_parser("api-key", help="create or revoke API keys")
    ksub = k.add_subparsers(dest="keycmd", required=True)
    kc = ksub.add_parser("create", help="create a key for an org; prints <key>:<secret> once")
    kc.add_argument("--org", required=True)
    kc.add_argument("--db", help=db_help)
    kr = ksub.add_parser("revoke", help="revoke a key")
    kr.add_argument("key_id")
    kr.add_argument("--db", help=db_help)

    m = sub.add_parser("migrate", help="bring the database schema up to date")
    m.add_argument("--db", help=db_help)

    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.cmd == "serve":
            return serve(args)
        from .auth import create_key, revoke_key

        engine, sessions = open_database(args.db)
        try:
            if args.cmd == "migrate":
                print("aus-server: schema up to date")
            elif args.keycmd == "create":
                org = args.org.strip()
                if not org or "/" in org:
                    print(f"aus-server: {args.org!r} is not an org id", file=sys.stderr)
                    return 2
                print(create_key(sessions, org))
            else:
                if not revoke_key(sessions, args.key_id):
                    print(f"aus-server: no API key {args.key_id!r}", file=sys.stderr)
                    return 1
                print(f"revoked {args.key_id}")
        finally:
            engine.dispose()
        return 0
    except AusError as exc:
        print(f"aus-server: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
