"""The policy bundle every ``ausd`` long-polls.

A bundle is the org's provisioned policy (its newest policy version, see
``policyversions``; rule edits wait in the draft until provisioned), the
user groups it names and each group's active immediate members: an
``aus.core.bundle.BundleDocument``, the model the daemon validates it with. Every write bumps the org's
``generation``; :class:`BundleService` rebuilds the bundle when the
generation moved (at most every ``interval`` seconds, so a burst of SCIM
requests costs one build), and only a bundle whose content changed gets a
new ``version``. The current bundle lives in the database, so replicas
sharing PostgreSQL serve the same version; each replica watches the
``bundles`` table and wakes its own long-pollers.

Each new version also stores the delta from the version before it
(``bundle_deltas``, the last :data:`HISTORY` versions), so a daemon that
names the version it holds (``since=``) gets only what changed: any
replica composes the chain of deltas from the table, once per
(org, from, to), and serves the same bytes to every poller. Full bundles
and deltas are gzip-compressed once per version, not per request.

A build the daemon's model refuses (data that reached the store without
the write-time checks of ``policycheck``: an older server, a hand edit)
never stops membership changes: the bundle published instead is the last
good policy with the current members of its groups, so removals and
disabled users still reach every workload. The failure is kept on the
bundle row (``build_*``: shown by ``GET /api/orgs/{org}/policy`` and the
console, logged, counted) and the build is tried again after 1 s, 2 s,
4 s, ... up to 5 minutes, and at once after every write.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.util import identity_key

from ..core.bundle import (
    BUNDLE_FORMAT,
    canonical_digest,
    compose_deltas,
    diff_documents,
    document_from_data,
)
from ..core.errors import PolicyError
from ..core.policy import parse_destination
from . import enforcement, metrics
from .db import (
    Bundle,
    BundleDelta,
    Group,
    Membership,
    Org,
    PolicyVersion,
    User,
    Workload,
    fold,
    utcnow,
)

log = logging.getLogger(__name__)

RETRY_FIRST = 1.0       # seconds before the first retry of a failed build
RETRY_MAX = 300.0       # the longest wait between two retries
HISTORY = 64            # versions whose delta from the one before is kept
GZIP_LEVEL = 6


def retry_delay(attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed build in a row."""
    return min(RETRY_MAX, RETRY_FIRST * 2.0 ** min(max(attempts - 1, 0), 30))


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive UTC times."""
    return t.replace(tzinfo=dt.timezone.utc) if t is not None and t.tzinfo is None else t


# Core, built once: every SCIM write ends with it (the ORM's bulk-update
# path costs more than the rest of a member PATCH's statements)
_TOUCH = update(Org.__table__).where(Org.__table__.c.id == bindparam("org")) \
    .values(generation=Org.__table__.c.generation + 1)


def touch(session: Session, org_id: str) -> None:
    """Mark the org's bundle stale; call inside the writing transaction."""
    session.flush()             # pending ORM changes first: the org row is locked last
    session.connection().execute(_TOUCH, {"org": org_id})
    org = session.identity_map.get(identity_key(Org, org_id))
    if org is not None:         # as the ORM's update would: the next read sees the new value
        session.expire(org, ["generation"])


def _is_literal(dest: str) -> bool:
    try:
        parse_destination(dest)
        return True
    except ValueError:
        return False


def build_content(session: Session, org_id: str) -> dict:
    """The bundle's policy and members, without version (pure read): the
    org's provisioned policy in force with the current members of its
    groups (the draft is not published until provisioned)."""
    return content_from_spec(session, org_id, active_spec(session, org_id))


def active_spec(session: Session, org_id: str) -> dict:
    """The spec of the org's newest provisioned version (empty if none)."""
    spec = session.scalar(select(PolicyVersion.spec).where(PolicyVersion.org_id == org_id)
                          .order_by(PolicyVersion.version.desc()).limit(1))
    return spec if spec is not None else {"rules": [], "ip_lists": []}


def content_from_spec(session: Session, org_id: str, spec: dict) -> dict:
    """A spec (rules naming source groups by id, IP lists) as the bundle's
    policy and members. Groups are resolved now, so a group renamed or
    deleted by the directory takes effect without a new policy version."""
    rules = spec["rules"]
    by_rule = {r["id"]: [src["id"] for src in r["sources"]] for r in rules}
    wanted = {g for ids in by_rule.values() for g in ids}
    groups = {g.id: g for g in session.scalars(
        select(Group).where(Group.org_id == org_id, Group.id.in_(wanted)))} if wanted else {}
    lists = {l["name"]: l["entries"] for l in spec["ip_lists"]}

    out_rules, used_lists, used_groups = [], {}, {}
    for rule in rules:
        names = [groups[g].display_name for g in by_rule[rule["id"]] if g in groups]
        if not names:
            continue   # every source group is gone: the rule grants nothing
        for d in rule["destinations"]:
            if not _is_literal(d) and d in lists:
                used_lists[d] = lists[d]
        for g in by_rule[rule["id"]]:
            if g in groups:
                used_groups[g] = groups[g]
        out_rules.append({"name": rule["name"], "sources": names,
                          "destinations": list(rule["destinations"]),
                          "services": list(rule["services"])})

    user_groups = []
    for g in sorted(used_groups.values(), key=lambda g: g.display_name):
        entry: dict = {"name": g.display_name}
        if g.sid:
            entry["sid"] = g.sid
        if g.external_id and g.external_id.strip():   # a blank one is no id
            entry["external_id"] = g.external_id
        user_groups.append(entry)
    return {
        "policy": {"user_groups": user_groups, "ip_lists": dict(sorted(used_lists.items())),
                   "services": {}, "rules": out_rules},
        "members": _members(session, org_id,
                            {g: used_groups[g].display_name for g in used_groups}),
    }


# The member lists of the last build, per (database, org): a membership
# change costs the members that came and went, not a read of every list
# (tens of thousands of names each at fleet size). A group's list is
# reused while its version (every SCIM write of the group bumps it) and
# its row count stay the same; a changed group reads its member ids (the
# primary key's index) and the names of the new ones only. Any change to
# the org's users (a new, renamed, disabled or deleted user: their count
# and last modification) reads everything again.
_MEMBER_CACHE: dict[tuple[str, str], tuple[tuple, dict[str, tuple]]] = {}
_MEMBER_CACHE_LOCK = threading.Lock()
# The last document published per (database, org), with its body: the next
# delta starts from it without parsing the body again.
_PUBLISHED: dict[tuple[str, str], tuple[str, dict]] = {}


def _active_names(session: Session, org_id: str, ids: list[str]) -> dict[str, str | None]:
    """Member id -> userName of the active users among ``ids`` (None for
    the others: disabled users, groups)."""
    out: dict[str, str | None] = dict.fromkeys(ids)
    for i in range(0, len(ids), 900):
        for uid, name in session.execute(select(User.id, User.user_name).where(
                User.org_id == org_id, User.id.in_(ids[i:i + 900]), User.active.is_(True))):
            out[uid] = name
    return out


def _group_members(session: Session, org_id: str, group_id: str,
                   known: dict[str, str | None]) -> dict[str, str | None]:
    ids = session.scalars(select(Membership.member_id)
                          .where(Membership.group_id == group_id)).all()
    new = [m for m in ids if m not in known]
    out = {m: known[m] for m in ids if m in known}
    out.update(_active_names(session, org_id, new))
    return out


def _members(session: Session, org_id: str, names: dict[str, str]) -> dict[str, list[str]]:
    """Group id -> name, to each name's active immediate members (userNames,
    sorted; every name present)."""
    ids = list(names)
    users_mark = tuple(session.execute(
        select(func.count(), func.max(User.modified_at)).where(User.org_id == org_id)).one())
    marks: dict[str, tuple] = {}
    for i in range(0, len(ids), 900):
        part = ids[i:i + 900]
        versions = dict(session.execute(select(Group.id, Group.version)
                                        .where(Group.id.in_(part))).all())
        counts = dict(session.execute(select(Membership.group_id, func.count())
                                      .where(Membership.group_id.in_(part))
                                      .group_by(Membership.group_id)).all())
        for g in part:
            marks[g] = (versions.get(g), counts.get(g, 0))
    key = (str(session.get_bind().url), org_id)
    with _MEMBER_CACHE_LOCK:
        mark, cached = _MEMBER_CACHE.get(key, (None, {}))
    if mark != users_mark:
        cached = {}
    entries: dict[str, tuple] = {}
    cold = []
    for g in ids:
        hit = cached.get(g)
        if hit is not None and hit[0] == marks[g]:
            entries[g] = hit
        elif hit is not None:
            by_id = _group_members(session, org_id, g, hit[1])
            entries[g] = (marks[g], by_id, sorted(n for n in by_id.values() if n is not None))
        else:
            cold.append(g)
    fresh: dict[str, dict[str, str | None]] = {g: {} for g in cold}
    for i in range(0, len(cold), 900):
        rows = session.execute(
            select(Membership.group_id, Membership.member_id, User.user_name, User.active)
            .outerjoin(User, User.id == Membership.member_id)
            .where(Membership.group_id.in_(cold[i:i + 900]))).all()
        for group_id, member_id, user_name, active in rows:
            fresh[group_id][member_id] = user_name if active else None
    for g, by_id in fresh.items():
        entries[g] = (marks[g], by_id, sorted(n for n in by_id.values() if n is not None))
    with _MEMBER_CACHE_LOCK:
        _MEMBER_CACHE[key] = (users_mark, entries)
    # Copies: the caller may change what it gets, the cache must not change.
    return {names[g]: list(entries[g][2]) for g in sorted(ids, key=lambda g: names[g])}


def current_members(session: Session, org_id: str, group_names: list[str]) -> dict[str, list[str]]:
    """The current members of the org's groups called ``group_names`` (as
    a published policy names them); a group gone from the store has none."""
    keys = {fold(n): n for n in group_names}
    found: dict[str, str] = {}
    key_list = list(keys)
    for i in range(0, len(key_list), 900):
        for gid, key in session.execute(select(Group.id, Group.display_name_key).where(
                Group.org_id == org_id, Group.display_name_key.in_(key_list[i:i + 900]))):
            found[gid] = keys[key]
    out = _members(session, org_id, found)
    for name in group_names:
        out.setdefault(name, [])
    return dict(sorted(out.items()))


def _digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def rebuild(session: Session, org_id: str, now: dt.datetime | None = None, *,
            force_version: int | None = None) -> Bundle:
    """Bring the org's bundle up to its generation, in the caller's
    transaction; the version moves only when the content changed (a
    provision passes ``force_version``: a provisioned policy is published
    as that version, above the current one, even if it builds the same). A build
    the daemon's model refuses publishes the last good policy with the
    current members instead, and is noted on the row (``build_*``)."""
    now = now or utcnow()
    org = session.get(Org, org_id, with_for_update=True)
    if org is None:
        raise KeyError(org_id)
    row = session.get(Bundle, org_id, with_for_update=True)
    if row is None:
        row = Bundle(org_id=org_id, version=0, generation=-1, digest="", body="",
                     build_attempts=0, build_failures_total=0)
        session.add(row)
    retry_due = row.build_error is not None and (row.build_retry_at is None
                                                 or _aware(row.build_retry_at) <= now)
    if row.generation == org.generation and row.body and not retry_due \
            and force_version is None:
        return row
    started = time.perf_counter()
    try:
        content = build_content(session, org_id)
        content.update(enforcement.bundle_key(session, org_id))
        digest = _digest(content)
        if digest != row.digest or not row.body or force_version is not None:
            # Validated as the daemon will: data the API let through but a
            # daemon would refuse is a PolicyError here.
            _publish(session, row,
                     _document(org_id, force_version or row.version + 1, now, content),
                     digest, now)
    except SQLAlchemyError:
        raise
    except Exception as exc:   # PolicyError, or a build that broke on odd data
        _build_failed(session, row, org_id, exc, now)
    else:
        if row.build_error is not None:
            log.warning("bundle of org %s builds again (version %d), after %d failed attempts",
                        org_id, row.version, row.build_attempts)
        row.build_error = row.build_failing_since = row.build_retry_at = None
        row.build_attempts = 0
    row.generation = org.generation
    metrics.BUILD_SECONDS.observe(time.perf_counter() - started)
    return row


def _document(org_id: str, version: int, now: dt.datetime, content: dict) -> dict:
    """The bundle document as published, validated as the daemon validates
    it. The member lists (most of a large bundle) are checked here in one
    pass for what the model checks of each name (a non-empty string, cut
    of surrounding spaces); the model validates everything else, and the
    whole document when a name fails, for its exact reasons."""
    data = {"format": BUNDLE_FORMAT, "org": org_id, "version": version,
            "generated_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"), **content}
    members = content.get("members")
    try:
        stripped = {name: list(map(str.strip, users)) for name, users in members.items()}
        ok = all(all(users) for users in stripped.values())
    except (AttributeError, TypeError):   # not a mapping of lists of strings
        ok = False
    if not ok:
        doc = document_from_data(data, f"bundle of org {org_id}")
        return doc.model_dump(mode="json", exclude_none=True)
    doc = document_from_data({**data, "members": {name: [] for name in members}},
                             f"bundle of org {org_id}")
    out = doc.model_dump(mode="json", exclude_none=True)
    out["members"] = stripped
    return out


def _publish(session: Session, row: Bundle, data: dict, digest: str, now: dt.datetime) -> None:
    old_body = row.body
    row.version = data["version"]
    row.digest = digest
    row.built_at = now
    row.body = json.dumps(data, separators=(",", ":"))
    if old_body:
        key = (str(session.get_bind().url), row.org_id)
        with _MEMBER_CACHE_LOCK:
            last = _PUBLISHED.get(key)
        old = last[1] if last is not None and last[0] == old_body else json.loads(old_body)
        _record_delta(session, row.org_id, old, data, len(row.body))
        with _MEMBER_CACHE_LOCK:
            _PUBLISHED[key] = (row.body, data)
    session.execute(delete(BundleDelta).where(BundleDelta.org_id == row.org_id,
                                              BundleDelta.version <= row.version - HISTORY))


def _record_delta(session: Session, org_id: str, old: dict, new: dict, full_size: int) -> None:
    """Keep the delta from ``old`` to ``new`` (unless it is no smaller than
    the bundle itself: then a daemon is better off with the bundle, and
    the chain through this version ends here)."""
    body = json.dumps(diff_documents(old, new, canonical_digest(new)), separators=(",", ":"))
    if len(body) >= full_size:
        return
    session.merge(BundleDelta(org_id=org_id, version=new["version"],
                              from_version=old["version"], body=body))


def _build_failed(session: Session, row: Bundle, org_id: str, exc: Exception,
                  now: dt.datetime) -> None:
    """Note the failure, schedule the retry, and publish the last good
    policy with the current members of its groups."""
    metrics.BUILD_FAILURES.inc()
    reason = "; ".join(exc.problems) if isinstance(exc, PolicyError) else \
        f"internal error ({type(exc).__name__}: {exc})"
    row.build_error = reason[:4000]
    row.build_failing_since = row.build_failing_since or now
    row.build_attempts = (row.build_attempts or 0) + 1
    row.build_failures_total = (row.build_failures_total or 0) + 1
    delay = retry_delay(row.build_attempts)
    row.build_retry_at = now + dt.timedelta(seconds=delay)
    if not row.body:
        log.error("bundle of org %s cannot be built (attempt %d, next in %.0f s) and no "
                  "policy was ever published: %s", org_id, row.build_attempts, delay, reason)
        return
    policy = json.loads(row.body)["policy"]
    members = current_members(session, org_id, [g["name"] for g in policy["user_groups"]])
    content = {"policy": policy, "members": members,
               **enforcement.bundle_key(session, org_id)}
    digest = _digest(content)
    if digest != row.digest:
        try:
            _publish(session, row, _document(org_id, row.version + 1, now, content),
                     digest, now)
        except PolicyError as again:   # members the model refuses: keep what is in force
            log.error("bundle of org %s: the last good policy with the current members is "
                      "refused too (%s); the bundle in force stays", org_id, again)
            return
    log.error("bundle of org %s cannot be built (attempt %d, next in %.0f s): %s; "
              "publishing the last good policy with the current members (version %d)",
              org_id, row.build_attempts, delay, reason, row.version)


def build_status(session: Session, org_id: str) -> dict:
    """How the org's last build went, for ``GET /api/orgs/{org}/policy``."""
    row = session.get(Bundle, org_id)
    failing = row is not None and row.build_error is not None
    return {
        "ok": not failing,
        "error": row.build_error if failing else None,
        "since": _iso(row.build_failing_since) if failing else None,
        "attempts": row.build_attempts if failing else 0,
        "next_attempt_at": _iso(row.build_retry_at) if failing else None,
        "failures_total": row.build_failures_total if row is not None else 0,
        "published": ("the last good policy with the current members of its groups"
                      if failing and row.body else None if failing else "the current policy"),
    }


def _iso(t: dt.datetime | None) -> str | None:
    t = _aware(t)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


@dataclass(frozen=True)
class Current:
    version: int
    etag: str
    body: bytes
    built_at: float | None = None   # Unix time
    gzip: bytes = b""               # ``body`` gzip-compressed, made once


@dataclass(frozen=True)
class Delta:
    """A delta as served: from ``from_version`` to the current version."""
    from_version: int
    version: int
    body: bytes
    gzip: bytes


DELTA_CACHE = 512            # composed deltas kept per replica: (org, from, to) -> bytes
DELTA_CACHE_BYTES = 64 << 20   # and at most this many bytes of them


def _size(delta: Delta | None) -> int:
    return len(delta.body) + len(delta.gzip) if delta is not None else 0


def compose_chain(rows: list[tuple[int, int, str]], since: int, to: int) -> dict | None:
    """The delta from ``since`` to ``to`` composed of stored deltas
    ``(from_version, version, body)``; None when the chain has a gap."""
    by_from = {f: (v, b) for f, v, b in rows}
    out, at = None, since
    while at != to:
        step = by_from.get(at)
        if step is None or step[0] > to:
            return None
        d = json.loads(step[1])
        out = d if out is None else compose_deltas(out, d)
        at = step[0]
    return out


class BundleService:
    """Keeps each org's bundle current and wakes long-pollers on change."""

    def __init__(self, sessions: sessionmaker, *, interval: float = 0.1, max_wait: float = 60.0):
        self.sessions = sessions
        self.interval = interval
        self.max_wait = max_wait
        self._current: dict[str, Current] = {}
        self._cond: asyncio.Condition | None = None
        self._poke: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._checkins: dict[tuple[str, str], tuple[int, str, dt.datetime, str | None]] = {}
        self._checkin_lock = threading.Lock()
        self._held: dict[str, float] = {}          # org -> monotonic time of its next try
        self._held_attempts: dict[str, int] = {}
        self._deltas: OrderedDict[tuple[str, int, int], Delta | None] = OrderedDict()
        self._delta_builds: dict[tuple[str, int, int], asyncio.Future] = {}
        self._delta_bytes = 0

    async def start(self) -> None:
        self._cond = asyncio.Condition()
        self._poke = asyncio.Event()
        await asyncio.to_thread(self._tick)
        self._task = asyncio.create_task(self._loop(), name="bundle-service")

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            # The loop also checks _stopping: a cancellation that lands as a
            # wait completes can be lost, and shutdown must not hang on it.
            await asyncio.wait({self._task}, timeout=5)

    def poke(self) -> None:
        """A write just committed: rebuild without waiting for the next tick."""
        if self._poke is not None:
            loop = self._task.get_loop() if self._task else None
            if loop is not None:
                loop.call_soon_threadsafe(self._poke.set)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                async with asyncio.timeout(self.interval):
                    await self._poke.wait()
            except TimeoutError:
                pass
            self._poke.clear()
            try:
                changed = await asyncio.to_thread(self._tick)
            except Exception:
                log.exception("bundle rebuild failed; the bundles in force stay")
                await asyncio.sleep(self.interval)
                continue
            if changed:
                async with self._cond:
                    self._cond.notify_all()
            await asyncio.sleep(self.interval)   # bounds rebuilds under a write burst

    def note_workload(self, org_id: str, name: str, version: int, address: str,
                      mode: str | None = None) -> None:
        with self._checkin_lock:
            self._checkins[(org_id, name)] = (version, address, utcnow(), mode)

    def _flush_checkins(self) -> None:
        with self._checkin_lock:
            batch, self._checkins = self._checkins, {}
        if not batch:
            return
        try:
            self._write_checkins(batch)
        except IntegrityError:   # another replica inserted one of them first
            self._write_checkins(batch)

    def _write_checkins(self, batch: dict) -> None:
        with self.sessions.begin() as s:
            known = {(w.org_id, w.name): w for w in s.scalars(select(Workload).where(
                Workload.org_id.in_({o for o, _ in batch}), Workload.name.in_({n for _, n in batch})))}
            for key, (version, address, seen, mode) in batch.items():
                row = known.get(key)
                if row is None:
                    s.add(Workload(org_id=key[0], name=key[1], enforcing_version=version,
                                   address=address, last_seen=seen, applied_mode=mode))
                else:
                    row.enforcing_version, row.address, row.last_seen = version, address, seen
                    row.applied_mode = mode

    def _tick(self) -> bool:
        """Rebuild stale bundles; load bundles other replicas built; write
        queued workload check-ins. Returns whether any org's current
        bundle changed."""
        try:
            self._flush_checkins()
        except Exception:
            log.exception("recording workload check-ins failed")
        now = utcnow()
        with self.sessions() as s:
            stale = s.execute(
                select(Org.id).outerjoin(Bundle, Bundle.org_id == Org.id)
                .where((Bundle.org_id.is_(None)) | (Bundle.generation != Org.generation)
                       | (Bundle.build_error.is_not(None) & (Bundle.build_retry_at <= now)))
            ).scalars().all()
        for org_id in stale:
            if self._held.get(org_id, 0.0) > time.monotonic():
                continue
            try:
                with self.sessions.begin() as s:
                    rebuild(s, org_id, now)
                self._held.pop(org_id, None)
            except Exception:
                # The database itself failed (the build's own failures are
                # handled by rebuild): back off here, the row cannot say so.
                n = self._held_attempts[org_id] = self._held_attempts.get(org_id, 0) + 1
                self._held[org_id] = time.monotonic() + retry_delay(n)
                log.exception("bundle of org %s: rebuild failed (attempt %d, next in %.0f s); "
                              "the bundle in force stays", org_id, n, retry_delay(n))
            else:
                self._held_attempts.pop(org_id, None)
        return self.refresh()

    def refresh(self) -> bool:
        changed = False
        with self.sessions() as s:
            versions = dict(s.execute(select(Bundle.org_id, Bundle.digest)).all())
            for org_id, digest in versions.items():
                cur = self._current.get(org_id)
                if cur is not None and cur.etag == f'"{digest[:32]}"':
                    continue
                row = s.get(Bundle, org_id)
                if row is None or not row.body:
                    continue
                built = _aware(row.built_at)
                body = row.body.encode()
                self._current[org_id] = Current(row.version, f'"{row.digest[:32]}"', body,
                                                built.timestamp() if built else None,
                                                gzip.compress(body, GZIP_LEVEL, mtime=0))
                changed = True
        return changed

    def rebuild_now(self, org_id: str) -> int:
        """Rebuild synchronously (after a management write) and return the
        version now in force."""
        with self.sessions.begin() as s:
            version = rebuild(s, org_id).version
        self.refresh()
        if self._cond is not None and self._task is not None:
            loop = self._task.get_loop()
            asyncio.run_coroutine_threadsafe(self._notify(), loop)
        return version

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    def current(self, org_id: str) -> Current | None:
        return self._current.get(org_id)

    async def delta(self, org_id: str, since: int, cur: Current) -> Delta | None:
        """The delta from version ``since`` to ``cur``, or None when this
        server cannot reach ``cur`` from there (too old, unknown, a gap)
        or the delta is no smaller than the bundle. Built once per
        (org, since, version) however many pollers ask at once."""
        if since >= cur.version:
            return None
        key = (org_id, since, cur.version)
        if key in self._deltas:
            self._deltas.move_to_end(key)
            return self._deltas[key]
        pending = self._delta_builds.get(key)
        if pending is None:
            pending = self._delta_builds[key] = asyncio.ensure_future(
                asyncio.to_thread(self._build_delta, org_id, since, cur))
            pending.add_done_callback(lambda f, key=key: self._delta_done(key, f))
        try:
            return await asyncio.shield(pending)
        except Exception:   # the database, or a stored delta that breaks: send the bundle
            log.exception("bundle of org %s: the delta from version %d to %d cannot be made; "
                          "sending the whole bundle", org_id, since, cur.version)
            return None

    def _delta_done(self, key: tuple[str, int, int], fut: asyncio.Future) -> None:
        self._delta_builds.pop(key, None)
        if fut.cancelled() or fut.exception() is not None:
            return
        delta = self._deltas[key] = fut.result()
        self._delta_bytes += _size(delta)
        while len(self._deltas) > DELTA_CACHE or self._delta_bytes > DELTA_CACHE_BYTES:
            _key, old = self._deltas.popitem(last=False)
            self._delta_bytes -= _size(old)

    def _build_delta(self, org_id: str, since: int, cur: Current) -> Delta | None:
        with self.sessions() as s:
            rows = s.execute(select(BundleDelta.from_version, BundleDelta.version,
                                    BundleDelta.body)
                             .where(BundleDelta.org_id == org_id, BundleDelta.version > since,
                                    BundleDelta.version <= cur.version)).all()
        delta = compose_chain([tuple(r) for r in rows], since, cur.version)
        if delta is None:
            return None
        body = json.dumps(delta, separators=(",", ":")).encode()
        if len(body) >= len(cur.body):
            return None
        return Delta(since, cur.version, body, gzip.compress(body, GZIP_LEVEL, mtime=0))

    def served(self) -> dict[str, Current]:
        """Every org's bundle in force, as this process serves it."""
        return dict(self._current)

    def running(self) -> bool:
        """Whether the loop that rebuilds bundles and wakes long-polls runs."""
        return self._task is not None and not self._task.done() and not self._stopping

    async def wait_change(self, org_id: str, etag: str | None, wait: float) -> Current | None:
        """The org's bundle once its ETag differs from ``etag``, or None
        after ``wait`` seconds (capped at ``max_wait``) without a change."""
        wait = max(0.0, min(wait, self.max_wait))
        cur = self._current.get(org_id)
        if cur is not None and cur.etag != etag:
            return cur
        deadline = asyncio.get_running_loop().time() + wait
        with metrics.LONG_POLLS.track_inprogress():
            return await self._wait(org_id, etag, deadline)

    async def _wait(self, org_id: str, etag: str | None, deadline: float) -> Current | None:
        async with self._cond:
            while True:
                cur = self._current.get(org_id)
                if cur is not None and cur.etag != etag:
                    return cur
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return None
                try:
                    async with asyncio.timeout(left):
                        await self._cond.wait()
                except TimeoutError:
                    return None


def parse_if_none_match(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(",")[0].strip().removeprefix("W/")


def accepts_gzip(value: str | None) -> bool:
    """Whether an Accept-Encoding header takes gzip (``gzip;q=0`` does not)."""
    for part in (value or "").split(","):
        name, _, params = part.partition(";")
        if name.strip().lower() in ("gzip", "x-gzip", "*"):
            q = params.strip().lower()
            if q.startswith("q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
    return False
