"""The traffic API under ``/api/orgs/{org_id}/traffic``: the org's merged
flow rows, filtered and paged (``GET traffic``), and the same rows summed
by chosen keys for the console (``GET traffic/grouped``).

Paging is by key, never by offset: rows come newest first by
``(last_seen, id)`` and the cursor is the last row's pair, so rows stored
while a client pages through never shift a page (no duplicates, no gaps).
The grouped form pages by its group keys in ascending order.

Every query bounds ``last_seen`` (the default window is the last
:data:`DEFAULT_WINDOW`) and ``hour`` with some slack, so an index range
scan (or, on a table partitioned by hour, partition pruning) reads only the
window asked for. The contract is in docs/traffic-api.md.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Request
from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    cast,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import CIDR, INET

from ..core.flowrecord import PROTOS, VERDICTS, hour_of, iso
from .api import API_PREFIX, ApiError, org_auth
from .db import Flow, flows_seen_since, ip_key

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
DEFAULT_WINDOW = dt.timedelta(hours=24)
# Slack on the upper ``hour`` bound (the lower one: db.flows_seen_since).
HOUR_SLACK_AFTER = dt.timedelta(hours=1)
MAX_TEXT = 256
GROUP_KEYS = ("group", "user", "workload", "dst", "proto", "port", "verdict", "rule", "process")
DEFAULT_GROUP_BY = ("group", "dst", "port", "proto")
FILTERS = ("user", "group", "workload", "dst", "port", "proto", "verdict", "since", "until")
NO_GROUP = ""   # the group key of a flow whose user is in no policy group

router = APIRouter(prefix=API_PREFIX, tags=["traffic"])

# The parameters as the OpenAPI document shows them; they are read and
# checked by hand (parse_filters) so that each problem answers 400 naming
# the parameter. docs/traffic-api.md has the full contract.
_DOC = {
    "user": "user name, exactly", "group": "policy group name, exactly",
    "workload": "workload name, exactly", "dst": "IPv4/IPv6 address or CIDR",
    "port": "0-65535", "proto": "tcp, udp, icmp, icmpv6, other",
    "verdict": "allowed, denied, would_deny; several joined by commas",
    "since": "ISO 8601 time with a zone; default 24 h before until (or now)",
    "until": "ISO 8601 time with a zone", "limit": f"1-{MAX_LIMIT}, default {DEFAULT_LIMIT}",
    "cursor": "the previous page's next",
    "by": f"comma-separated keys from {', '.join(GROUP_KEYS)}; default {','.join(DEFAULT_GROUP_BY)}",
}


def _openapi(names: tuple[str, ...]) -> dict:
    return {"parameters": [{"name": n, "in": "query", "required": False, "description": _DOC[n],
                            "schema": {"type": "string"}} for n in names]}


# --------------------------------------------------------------------------
# Parameters


def _bad(name: str, message: str) -> ApiError:
    return ApiError(400, f"query parameter {name!r}: {message}", [{"field": name, "message": message}])


def _time(name: str, value: str) -> dt.datetime:
    raw = value.strip()
    if raw.endswith(("z", "Z")):
        raw = raw[:-1] + "+00:00"
    try:
        t = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise _bad(name, f"{value!r} is not an ISO 8601 time such as 2026-12-06T03:00:00Z") from None
    if t.tzinfo is None:
        raise _bad(name, f"{value!r} has no time zone (add Z for UTC)")
    # Far enough from the calendar's ends that the window's slack fits.
    if not 1970 <= t.year <= 9000:
        raise _bad(name, f"{value!r} is outside the years 1970-9000")
    return t.astimezone(dt.timezone.utc)


def _text(name: str, value: str) -> str:
    if len(value) > MAX_TEXT:
        raise _bad(name, f"longer than {MAX_TEXT} characters")
    if any(ord(c) < 32 for c in value):
        raise _bad(name, "contains a control character")
    return value


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        if "/" not in value:
            return ipaddress.ip_network(ipaddress.ip_address(value))
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _bad("dst", f"{value!r} is not an IPv4 or IPv6 address or CIDR") from None


@dataclass
class Filters:
    user: str | None = None
    group: str | None = None
    workload: str | None = None
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None
    proto: str | None = None
    verdicts: tuple[str, ...] = ()
    since: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    until: dt.datetime | None = None

    since_given: bool = False

    def fingerprint(self, extra: str = "") -> str:
        """What a cursor was made for: a cursor only continues the query it
        came from. A default ``since`` is carried in the cursor instead, so
        every page of one listing covers the same window."""
        parts = [self.user, self.group, self.workload, str(self.dst), self.port, self.proto,
                 ",".join(self.verdicts), self.since.isoformat() if self.since_given else None,
                 self.until.isoformat() if self.until else None, extra]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _single(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise _bad(name, f"unknown parameter (known: {', '.join(allowed)})")
        if name in params:
            raise _bad(name, "given more than once")
        params[name] = value
    return params


def parse_filters(params: dict[str, str], now: dt.datetime) -> Filters:
    f = Filters()
    for name in ("user", "group", "workload"):
        if name in params:
            setattr(f, name, _text(name, params[name]))
    if "dst" in params:
        f.dst = _network(params["dst"].strip())
    if "port" in params:
        raw = params["port"].strip()
        if not (raw.isascii() and raw.isdigit()) or int(raw) > 65535:
            raise _bad("port", f"{params['port']!r} is not a port number 0-65535")
        f.port = int(raw)
    if "proto" in params:
        proto = params["proto"].strip().lower()
        if proto not in PROTOS:
            raise _bad("proto", f"{params['proto']!r} is not one of {', '.join(PROTOS)}")
        f.proto = proto
    if "verdict" in params:
        verdicts = [v.strip().lower() for v in params["verdict"].split(",") if v.strip()]
        for v in verdicts:
            if v not in VERDICTS:
                raise _bad("verdict", f"{v!r} is not one of {', '.join(VERDICTS)}")
        if not verdicts:
            raise _bad("verdict", f"expected one or more of {', '.join(VERDICTS)}")
        f.verdicts = tuple(sorted(set(verdicts)))
    f.until = _time("until", params["until"]) if "until" in params else None
    if "since" in params:
        f.since = _time("since", params["since"])
        f.since_given = True
    else:
        f.since = (f.until or now) - DEFAULT_WINDOW
    if f.until is not None and f.until < f.since:
        raise _bad("until", "is before since")
    return f


def _limit(params: dict[str, str]) -> int:
    if "limit" not in params:
        return DEFAULT_LIMIT
    raw = params["limit"].strip()
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise _bad("limit", f"{params['limit']!r} is not a number from 1 to {MAX_LIMIT}")
    return int(raw)


def _encode_cursor(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def _cursor(params: dict[str, str], f: Filters, fingerprint: str) -> dict | None:
    """The cursor's contents, with ``f.since`` set back to the window the
    first page used; None without a cursor."""
    if "cursor" not in params:
        return None
    data = _decode_cursor(params["cursor"], fingerprint)
    if not f.since_given:
        try:
            f.since = _utc(dt.datetime.fromisoformat(data["s"]))
        except (KeyError, TypeError, ValueError):
            raise _bad("cursor", "not a cursor this API returned") from None
    return data


def _decode_cursor(raw: str, fingerprint: str) -> dict:
    try:
        if len(raw) > 4096:
            raise ValueError
        data = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if not isinstance(data, dict):
            raise ValueError
    except ValueError:
        raise _bad("cursor", "not a cursor this API returned") from None
    if data.get("f") != fingerprint:
        raise _bad("cursor", "was returned for other parameters; page with the same filters, "
                             "or start again without a cursor")
    return data


# --------------------------------------------------------------------------
# Conditions


def _utc(t: dt.datetime) -> dt.datetime:
    """Times read back from SQLite carry no zone; every stored time is UTC."""
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def _groups_contain(dialect: str, name: str) -> ColumnElement[bool]:
    if dialect == "postgresql":
        elems = func.json_array_elements_text(Flow.groups).table_valued("value").alias("g")
    else:
        elems = func.json_each(Flow.groups).table_valued("value").alias("g")
    return exists(select(literal(1)).select_from(elems).where(elems.c.value == name))


def _dst_in(dialect: str, net) -> ColumnElement[bool]:
    if net.num_addresses == 1:
        return Flow.dst == str(net.network_address)
    if dialect == "postgresql":
        return cast(Flow.dst, INET).op("<<=")(cast(str(net), CIDR))
    lo, hi = ip_key(str(net.network_address)), ip_key(str(net.broadcast_address))
    return func.aus_ip_key(Flow.dst).between(lo, hi)


def conditions(org_id: str, f: Filters, dialect: str) -> list[ColumnElement[bool]]:
    # A row overlaps the window when it was last seen after `since` and
    # first seen before `until`.
    where = [Flow.org_id == org_id, *flows_seen_since(f.since)]
    if f.until is not None:
        where += [Flow.first_seen <= f.until, Flow.hour <= hour_of(f.until) + HOUR_SLACK_AFTER]
    if f.user is not None:
        where.append(Flow.user_name == f.user)
    if f.workload is not None:
        where.append(Flow.workload == f.workload)
    if f.port is not None:
        where.append(Flow.port == f.port)
    if f.proto is not None:
        where.append(Flow.proto == f.proto)
    if f.verdicts:
        where.append(Flow.verdict.in_(f.verdicts))
    if f.dst is not None:
        where.append(_dst_in(dialect, f.dst))
    if f.group is not None:
        where.append(_groups_contain(dialect, f.group))
    return where


def _dialect(request: Request) -> str:
    return request.app.state.engine.dialect.name


# --------------------------------------------------------------------------
# Routes


def _item(r: Flow) -> dict:
    return {
        "workload": r.workload, "user": r.user_name, "login_uid": r.login_uid,
        "groups": list(r.groups or []), "process": r.process, "dst": r.dst, "proto": r.proto,
        "port": r.port, "verdict": r.verdict, "rule": r.rule,
        "first_seen": iso(_utc(r.first_seen)), "last_seen": iso(_utc(r.last_seen)),
        "count": r.count,
    }


@router.get("/traffic", openapi_extra=_openapi(FILTERS + ("limit", "cursor")))
def list_traffic(request: Request, org_id: str = Depends(org_auth)) -> dict:
    """Flow rows newest first; ``next`` continues after the last one."""
    now = dt.datetime.now(dt.timezone.utc)
    params = _single(request, FILTERS + ("limit", "cursor"))
    f = parse_filters(params, now)
    limit = _limit(params)
    fp = f.fingerprint("items")
    cur = _cursor(params, f, fp)
    where = conditions(org_id, f, _dialect(request))
    if cur is not None:
        try:
            t, i = _utc(dt.datetime.fromisoformat(cur["t"])), int(cur["i"])
        except (KeyError, TypeError, ValueError):
            raise _bad("cursor", "not a cursor this API returned") from None
        # Spelled so an index on (org_id, last_seen) serves it as a range.
        where.append(and_(Flow.last_seen <= t, or_(Flow.last_seen < t, Flow.id < i)))
    with request.app.state.sessions() as s:
        rows = s.scalars(select(Flow).where(*where)
                         .order_by(Flow.last_seen.desc(), Flow.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = None
    if more:
        last = rows[-1]
        nxt = _encode_cursor({"t": _utc(last.last_seen).isoformat(), "i": last.id, "f": fp,
                              "s": f.since.isoformat()})
    return {"items": [_item(r) for r in rows], "next": nxt}


def _group_by(params: dict[str, str]) -> tuple[str, ...]:
    if "by" not in params:
        return DEFAULT_GROUP_BY
    keys = [k.strip() for k in params["by"].split(",") if k.strip()]
    if not keys:
        raise _bad("by", f"expected one or more of {', '.join(GROUP_KEYS)}")
    seen: list[str] = []
    for k in keys:
        if k not in GROUP_KEYS:
            raise _bad("by", f"{k!r} is not one of {', '.join(GROUP_KEYS)}")
        if k in seen:
            raise _bad("by", f"{k!r} is listed twice")
        seen.append(k)
    return tuple(seen)


@router.get("/traffic/grouped", openapi_extra=_openapi(FILTERS + ("by", "limit", "cursor")))
def grouped_traffic(request: Request, org_id: str = Depends(org_auth)) -> dict:
    """Flow rows summed by ``by`` (default group, dst, port, proto): one row
    per distinct key, ordered by the keys; a flow whose user has several
    groups counts once under each group."""
    now = dt.datetime.now(dt.timezone.utc)
    params = _single(request, FILTERS + ("by", "limit", "cursor"))
    f = parse_filters(params, now)
    by = _group_by(params)
    limit = _limit(params)
    fp = f.fingerprint("grouped:" + ",".join(by))
    cur = _cursor(params, f, fp)
    after = None
    if cur is not None:
        after = cur.get("k")
        if not isinstance(after, list) or len(after) != len(by):
            raise _bad("cursor", "not a cursor this API returned")
    stmt = grouped_statement(org_id, f, by, _dialect(request), after, limit + 1)
    with request.app.state.sessions() as s:
        if s.get_bind().dialect.name == "postgresql":
            # Summing a day of rows looks costly enough to PostgreSQL to
            # compile it (JIT), which takes longer than the sum itself.
            s.execute(text("SET LOCAL jit = off"))
        rows = s.execute(stmt).mappings().all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = []
    for r in rows:
        item = {k: r[k] for k in by}
        item.update({
            "count": int(r["count"] or 0), "rows": int(r["rows"]),
            "verdicts": {v: int(r[v] or 0) for v in VERDICTS},
            "users": int(r["users"]), "workloads": int(r["workloads"]),
            "first_seen": iso(_utc(_as_time(r["first_seen"]))),
            "last_seen": iso(_utc(_as_time(r["last_seen"]))),
        })
        items.append(item)
    nxt = (_encode_cursor({"k": [rows[-1][k] for k in by], "f": fp, "s": f.since.isoformat()})
           if more else None)
    return {"by": list(by), "items": items, "next": nxt}


def grouped_statement(org_id: str, f: Filters, by: tuple[str, ...], dialect: str,
                      after: list | None, limit: int):
    """The grouped form's query: the filtered rows summed by ``by``, the
    groups after ``after`` (the last keys of the previous page) in key
    order."""
    where = conditions(org_id, f, dialect)
    columns = {
        "user": Flow.user_name, "workload": Flow.workload, "dst": Flow.dst, "proto": Flow.proto,
        "port": Flow.port, "verdict": Flow.verdict, "rule": Flow.rule, "process": Flow.process,
    }
    if "group" in by:
        if dialect == "postgresql":
            elems = func.json_array_elements_text(Flow.groups).table_valued("value").lateral("g")
        else:
            elems = func.json_each(Flow.groups).table_valued("value").alias("g")
        if f.group is not None:   # only the asked-for group's rows, not its members' other groups
            where.append(elems.c.value == f.group)
        columns["group"] = func.coalesce(elems.c.value, NO_GROUP)
    if dialect == "postgresql":
        # Sort and group text by its bytes, as SQLite does: the same order
        # on both engines, and several times cheaper than a locale's rules.
        columns = {k: (c if k == "port" else c.collate("C")) for k, c in columns.items()}
    if after is not None:
        # The first key alone already skips the groups of earlier pages
        # before they are summed; the outer query places the rest.
        where.append(columns[by[0]] >= after[0])

    def verdict_sum(v: str):
        return func.sum(case((Flow.verdict == v, Flow.count), else_=0)).label(v)

    aggregate = select(*[columns[k].label(k) for k in by],
                       func.sum(Flow.count).label("count"), func.count().label("rows"),
                       func.min(Flow.first_seen).label("first_seen"),
                       func.max(Flow.last_seen).label("last_seen"),
                       *[verdict_sum(v) for v in VERDICTS],
                       func.count(func.distinct(Flow.user_name)).label("users"),
                       func.count(func.distinct(Flow.workload)).label("workloads")).select_from(Flow)
    if "group" in by:
        aggregate = aggregate.outerjoin(elems, true())
    grouped = aggregate.where(*where).group_by(*[columns[k] for k in by]).subquery("grouped")
    order = [grouped.c[k] for k in by]
    outer = select(grouped)
    if after is not None:
        outer = outer.where(tuple_(*order) > tuple_(*[literal(v) for v in after]))
    return outer.order_by(*order).limit(limit)


def _as_time(value) -> dt.datetime:
    """min()/max() over a DateTime column come back as text on SQLite."""
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    return value


def install(app) -> None:
    app.include_router(router)
