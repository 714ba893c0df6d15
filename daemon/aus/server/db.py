"""Storage: the tables, the engine, and schema migrations.

SQLite is the default (one file, no set-up); PostgreSQL is used when
several server replicas share one database. Both run the same Alembic
migrations (``migrations/``), applied by :func:`open_database`.

Case-insensitive uniqueness (SCIM userName and group displayName are
``caseExact: false``) is kept in ``*_key`` columns holding the casefolded
value, so the same unique index and the same lookups work on both engines.
Names themselves are stored exactly as sent.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import threading
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    sessionmaker,
    validates,
)

from ..core.errors import AusError
from ..core.policy import external_id_key, name_key

# The state directory of aus-server.service (StateDirectory=aus-server).
DEFAULT_DB = "sqlite:////var/lib/aus-server/aus-server.db"


class StoreError(AusError):
    """The database is unreachable, or its schema cannot be brought up to date."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def fold(text: str) -> str:
    """The key under which names compare case-insensitively."""
    return text.casefold()


class Base(DeclarativeBase):
    pass


class Org(Base):
    __tablename__ = "orgs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Bumped by every write that may change the bundle; the bundle builder
    # compares it with the generation its last bundle was built from.
    generation: Mapped[int] = mapped_column(Integer, default=0)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), index=True)
    salt: Mapped[bytes] = mapped_column(LargeBinary(32))
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    # Migration 0009. ``scopes``: space-separated names from aus.server.scopes
    # (keys made before scopes existed are "admin", what they could do).
    scopes: Mapped[str] = mapped_column(String(64), default="admin", server_default="admin")
    label: Mapped[str] = mapped_column(Text, default="", server_default="")
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True),
                                                           nullable=True)


class AuthState(Base):
    """One row (id 1): ``revocations`` counts key revocations, so every
    process can tell with one cheap read that its verified-key cache is stale."""

    __tablename__ = "auth_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revocations: Mapped[int] = mapped_column(Integer, default=0)


class User(Base):
    """A SCIM user. ``doc`` is the resource as accepted (core + extension
    attributes, without id/meta); the columns are what filters and the
    bundle need."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    user_name: Mapped[str] = mapped_column(Text)
    user_name_key: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    display_name: Mapped[str | None] = mapped_column(Text, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    doc: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    modified_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    version: Mapped[int] = mapped_column(Integer, default=1)
    __table_args__ = (
        UniqueConstraint("org_id", "user_name_key", name="uq_users_org_name"),
        Index("ix_users_org_external", "org_id", "external_id"),
        # Migration 0010: the bundle build's check for changed users.
        Index("ix_users_org_modified", "org_id", "modified_at"),
    )


class Group(Base):
    """A user group: pushed by SCIM (``source`` "scim") or added by hand
    (``source`` "manual", name + SID as for Active Directory)."""

    __tablename__ = "groups"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    display_name: Mapped[str] = mapped_column(Text)
    display_name_key: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    # external_id as the bundle compares it (core.policy.external_id_key)
    external_id_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    sid: Mapped[str | None] = mapped_column(Text, nullable=True)
    source: Mapped[str] = mapped_column(String(16), default="scim")
    doc: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    modified_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_sync_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_sync_op: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_sync_outcome: Mapped[str | None] = mapped_column(Text, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    __table_args__ = (
        UniqueConstraint("org_id", "display_name_key", name="uq_groups_org_name"),
        Index("ix_groups_org_external", "org_id", "external_id"),
        Index("ix_groups_org_external_key", "org_id", "external_id_key"),
        Index("ix_groups_org_sid", "org_id", "sid"),
    )

    @validates("external_id")
    def _keep_external_id_key(self, _key: str, value: str | None) -> str | None:
        self.external_id_key = (external_id_key(value) or None) if value else None
        return value


class Membership(Base):
    """An immediate member of a group: a user, or (kept visible, never
    expanded) another group."""

    __tablename__ = "memberships"
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"),
                                          primary_key=True)
    member_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    member_type: Mapped[str] = mapped_column(String(8))  # "User" | "Group"
    __table_args__ = (Index("ix_memberships_member", "member_id"),)


class Rule(Base):
    __tablename__ = "rules"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    # name as the bundle compares it: case-insensitively (core.policy.name_key).
    # Not unique in the schema (rows from before it existed may clash); the
    # write-time check (policycheck) keeps it unique under the org's lock.
    name_key: Mapped[str | None] = mapped_column(String(63), nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    # Each destination is a CIDR, an address, a dns: name, or the name of an IpList.
    destinations: Mapped[list] = mapped_column(JSON)
    services: Mapped[list] = mapped_column(JSON)
    position: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    modified_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_rules_org_name"),
                      Index("ix_rules_org_name_key", "org_id", "name_key"))

    @validates("name")
    def _keep_name_key(self, _key: str, value: str) -> str:
        self.name_key = name_key(value)
        return value


class IpList(Base):
    """A named list of addresses, CIDRs and dns: names that rules use as a destination."""

    __tablename__ = "ip_lists"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    entries: Mapped[list] = mapped_column(JSON)
    modified_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_ip_lists_org_name"),)


class RuleSource(Base):
    """A rule's source group. No foreign key to groups: a group deleted by
    the directory leaves the rule pointing at nothing, which the API shows."""

    __tablename__ = "rule_sources"
    rule_id: Mapped[str] = mapped_column(ForeignKey("rules.id", ondelete="CASCADE"),
                                         primary_key=True)
    group_id: Mapped[str] = mapped_column(String(36), primary_key=True, index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)


class Bundle(Base):
    """The org's current policy bundle, shared by every replica."""

    __tablename__ = "bundles"
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"),
                                        primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    digest: Mapped[str] = mapped_column(String(64), default="")
    body: Mapped[str] = mapped_column(Text, default="")
    built_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The last build of the org's policy, when it failed: why, since when,
    # how many times in a row, and when it is tried again. While it fails,
    # ``body`` is the last good policy with the current memberships.
    build_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    build_failing_since: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True),
                                                                    nullable=True)
    build_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    build_retry_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True),
                                                               nullable=True)
    # Every failed build of the org, ever (a counter for monitoring).
    build_failures_total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class BundleDelta(Base):
    """The changes from bundle ``from_version`` to ``version`` of an org
    (an ``aus.bundle-delta/1`` document), kept for the last versions so
    every replica can answer ``since=`` with a delta."""

    __tablename__ = "bundle_deltas"
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"),
                                        primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    from_version: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)


class Workload(Base):
    """A daemon that fetched the bundle, as it last reported itself."""

    __tablename__ = "workloads"
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"),
                                        primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    address: Mapped[str] = mapped_column(String(64), default="")
    enforcing_version: Mapped[int] = mapped_column(Integer, default=0)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The mode the daemon said it applies (X-Aus-Mode); None: it did not say.
    applied_mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Flow records the workload reported dropped (the sum of its batches'
    # ``dropped``), and when it last reported any (migration 0008).
    flows_dropped: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    flows_dropped_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True),
                                                                 nullable=True)


class Flow(Base):
    """Flow records of the org's workloads, merged by (workload, login UID,
    user, destination, protocol, port, verdict, rule, hour): storage grows
    with distinct flows, not with connections. ``rule`` is "" when no rule
    decided (a NULL would make every such row distinct to the unique index).

    On PostgreSQL the table is partitioned by day of ``hour`` (migration
    0004, :mod:`.flowstore`) and its primary key is (id, hour)."""

    __tablename__ = "flows"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(String(64))
    hour: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    workload: Mapped[str] = mapped_column(String(255))
    login_uid: Mapped[int] = mapped_column(BigInteger)
    user_name: Mapped[str] = mapped_column(Text, default="")
    groups: Mapped[list] = mapped_column(JSON, default=list)
    process: Mapped[str] = mapped_column(String(64), default="")
    dst: Mapped[str] = mapped_column(String(45))
    proto: Mapped[str] = mapped_column(String(8))
    port: Mapped[int] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(16))
    rule: Mapped[str] = mapped_column(String(64), default="")
    first_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    __table_args__ = (
        UniqueConstraint("org_id", "workload", "login_uid", "user_name", "dst", "proto",
                         "port", "verdict", "rule", "hour", name="uq_flows_merge"),
        Index("ix_flows_org_last_seen", "org_id", "last_seen"),
        Index("ix_flows_org_user", "org_id", "user_name", "last_seen"),
        # Migration 0005: the traffic API's filters by workload and by address.
        Index("ix_flows_org_workload", "org_id", "workload", "last_seen"),
        Index("ix_flows_org_dst", "org_id", "dst", "last_seen"),
        # What SQLite's retention deletes by; PostgreSQL drops partitions.
        Index("ix_flows_hour", "hour").ddl_if(dialect="sqlite"),
    )


# A row's hour is the start of the hour its first record began in, and a
# record spans at most one agent window (at most an hour): a row last seen
# after ``since`` has its hour at most two hours before it. Bounding ``hour``
# too lets PostgreSQL skip the day partitions the window cannot touch.
FLOW_HOUR_SLACK = dt.timedelta(hours=2)


def flows_seen_since(since: dt.datetime) -> list:
    """The WHERE terms for flow rows last seen at or after ``since``."""
    return [Flow.last_seen >= since,
            Flow.hour >= since.astimezone(dt.timezone.utc).replace(
                minute=0, second=0, microsecond=0) - FLOW_HOUR_SLACK]

class EnforcementMode(Base):
    """A mode the server sets: a workload's (``workload`` its name, which
    may not have checked in yet), or the org's default (``workload`` "":
    no workload is called that). An org without a default row sets none,
    and its workloads keep the mode of their own configuration."""

    __tablename__ = "enforcement_modes"
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"),
                                        primary_key=True)
    workload: Mapped[str] = mapped_column(String(255), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16))        # "enforce" | "visibility"
    changed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    changed_by: Mapped[str] = mapped_column(String(64), default="")   # the API key's id


class PolicyVersion(Base):
    """A provisioned policy: immutable. The org's newest version is the one
    in force; the rules and ip_lists tables are its draft. ``spec`` is the
    draft as it was (rules with source group ids, IP lists), ``policy`` the
    policy document as the bundle carried it when provisioned. ``key_id``
    is the API key that provisioned it (None: snapshotted by migration)."""

    __tablename__ = "policy_versions"
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"),
                                        primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    spec: Mapped[dict] = mapped_column(JSON)
    policy: Mapped[dict] = mapped_column(JSON)
    note: Mapped[str] = mapped_column(Text, default="")
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rolled_back_from: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """One change to an org's configuration: who (the API key's id and its
    label then; ``cli`` for the local aus-server command), when, what
    (``action`` such as "rule.update", ``target`` the object's id or name)
    and the object before and after (None where it did not exist)."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(String(64))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    key_id: Mapped[str] = mapped_column(String(64), default="")
    key_label: Mapped[str] = mapped_column(Text, default="")
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(Text, default="")
    before: Mapped[dict | list | None] = mapped_column(JSON, nullable=True)
    after: Mapped[dict | list | None] = mapped_column(JSON, nullable=True)
    __table_args__ = (Index("ix_audit_org_id", "org_id", "id"),)


# --------------------------------------------------------------------------
# Engine


def _private_file(path: Path) -> None:
    """Create the SQLite file 0600 (in a directory made 0700) before SQLite
    does, which would use the umask; its -wal and -shm files take the main
    file's mode. An existing file readable by others is tightened."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        st = path.stat()
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.chmod(path, 0o600)
            for suffix in ("-wal", "-shm"):
                side = path.with_name(path.name + suffix)
                if side.exists():
                    os.chmod(side, 0o600)


def ip_key(address: str | None) -> str | None:
    """An address as text that sorts in address order within its family
    ("4" + 8 hex digits, "6" + 32): SQLite, which has no address type,
    matches a CIDR as a range of these (``aus_ip_key``)."""
    try:
        ip = ipaddress.ip_address(address)
    except (TypeError, ValueError):
        return None
    return f"{ip.version}{int(ip):0{ip.max_prefixlen // 4}x}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.create_function("aus_ip_key", 1, ip_key, deterministic=True)
    # Transactions are begun by the "begin" listener below, not by pysqlite.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # WAL lets readers go on while one writer commits; busy_timeout makes
    # concurrent writers queue instead of failing with "database is locked".
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:" and not path.startswith("file:"):
            _private_file(Path(path))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=20, max_overflow=20)
        event.listen(engine, "connect", _sqlite_pragmas)
        # Take the write lock at BEGIN, so a transaction that reads then
        # writes never fails on lock upgrade ("database is locked"); one
        # begun with execution option read_only=True takes none (WAL readers
        # run beside the writer). Writers of this process queue on a
        # threading lock first: SQLite's own lock is polled by a sleeping
        # busy handler, and a poller loses every race to writers woken at
        # once, past any timeout.
        writer = threading.Lock()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):  # noqa: ANN001
            if conn.get_execution_options().get("read_only"):
                conn.exec_driver_sql("BEGIN")
                return
            writer.acquire()
            conn.info["aus_writer"] = True
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                _end_write(conn.info)
                raise

        def _end_write(info: dict) -> None:
            if info.pop("aus_writer", False):
                writer.release()

        event.listen(engine, "commit", lambda conn: _end_write(conn.info))
        event.listen(engine, "rollback", lambda conn: _end_write(conn.info))
        # A connection returned to the pool mid-transaction is rolled back
        # by the pool itself, without the events above.
        def _on_reset(_dbapi, record, _reset_state) -> None:
            _end_write(record.info)

        event.listen(engine.pool, "reset", _on_reset)
        event.listen(engine.pool, "checkin", lambda _dbapi, record: _end_write(record.info))
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    # No pre-ping: it costs a round trip per request; recycle instead, and a
    # dropped connection fails one request, which the client retries.
    return create_engine(url, pool_size=20, max_overflow=20, pool_recycle=1800)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_database(url: str | None = None) -> tuple[Engine, sessionmaker]:
    url = url or os.environ.get("AUS_SERVER_DB") or DEFAULT_DB
    try:
        engine = make_engine(url)
        migrate(engine)
    except Exception as exc:  # driver, network and migration errors alike
        raise StoreError(f"database {redact(url)}: {exc}") from exc
    return engine, sessionmaker(engine, expire_on_commit=False)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database URL>"
