"""Flow records: what a workload reports of its users' traffic.

ausd folds the kernel's flow events into records (one per workload,
login UID, destination, protocol, port, verdict and rule within a window)
and uploads them in batches; aus-server validates each batch with the
same models and merges the records by hour. Both sides import this module,
so the wire format cannot drift::

    {"format": 1, "workload": "web-1", "dropped": 0,
     "records": [{"login_uid": 1000, "user": "alice", "groups": ["DEV"],
                  "process": "curl", "dst": "192.0.2.10", "proto": "tcp",
                  "port": 443, "verdict": "would_deny", "rule": "",
                  "first_seen": "2026-12-06T03:00:01Z",
                  "last_seen": "2026-12-06T03:00:07Z", "count": 3}]}

``dns_name`` (optional) is the DNS name whose answer allowed the
destination to that user, when a name rule did. ``verdict`` is ``allowed``, ``denied`` or ``would_deny`` (visibility mode:
denied by the policy, let through). ``rule`` is the name of the deciding
rule, ``baseline``, or ``""`` when no rule allowed it. ``port`` is 0 for
ICMP and for protocols without ports. ``dropped`` counts records the
workload discarded before this batch (spool full, window full).
"""

from __future__ import annotations

import datetime as _dt
import functools
import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

FLOW_FORMAT = 1
MAX_BATCH_RECORDS = 5000          # records in one upload
MAX_BATCH_BYTES = 8 << 20         # one batch, uncompressed
MAX_GROUPS = 64                   # policy groups named on one record
VERDICTS = ("allowed", "denied", "would_deny")
PROTOS = ("tcp", "udp", "icmp", "icmpv6", "other")

Verdict = Literal["allowed", "denied", "would_deny"]
Proto = Literal["tcp", "udp", "icmp", "icmpv6", "other"]


# Control characters, and lone surrogates (JSON can carry them as \ud800
# escapes; no database can store them as text).
_BAD_TEXT = re.compile("[\x00-\x1f\ud800-\udfff]")


def _utc(value: Any) -> _dt.datetime:
    """An ISO 8601 time with a zone, as UTC."""
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError("expected an ISO 8601 time such as 2026-12-06T03:00:00Z")
    return _utc_text(value)


# A batch repeats the same few seconds and addresses many times; parsing
# each once keeps validation of a full batch to milliseconds.
@functools.lru_cache(maxsize=4096)
def _utc_text(value: str) -> _dt.datetime:
    try:
        t = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone (add Z for UTC)")
    return t.astimezone(_dt.timezone.utc)


def _text(limit: int):
    def check(value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        if len(value) > limit:
            raise ValueError(f"longer than {limit} characters")
        bad = _BAD_TEXT.search(value)
        if bad:
            raise ValueError("contains a control character" if bad.group() < " "
                             else f"contains an unpaired surrogate (U+{ord(bad.group()):04X})")
        return value
    return BeforeValidator(check)


UtcTime = Annotated[_dt.datetime, BeforeValidator(_utc)]


def iso(t: _dt.datetime) -> str:
    """UTC, second precision, with a Z: the form records travel in."""
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def hour_of(t: _dt.datetime) -> _dt.datetime:
    """The start of the UTC hour holding ``t``: the server merges by it."""
    return t.astimezone(_dt.timezone.utc).replace(minute=0, second=0, microsecond=0)


@functools.lru_cache(maxsize=16384)
def _address(v: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 or IPv6 address") from None


class FlowRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    login_uid: int = Field(ge=0, le=4294967294)
    user: Annotated[str, _text(256)] = ""
    groups: list[Annotated[str, _text(256)]] = Field(default_factory=list, max_length=MAX_GROUPS)
    process: Annotated[str, _text(64)] = ""
    dst: str
    proto: Proto
    port: int = Field(ge=0, le=65535)
    verdict: Verdict
    rule: Annotated[str, _text(64)] = ""
    first_seen: UtcTime
    last_seen: UtcTime
    count: int = Field(ge=1, le=1 << 53)
    # the DNS name whose answer allowed the destination (docs/dns.md)
    dns_name: Annotated[str, _text(253)] = ""

    @field_validator("dst", mode="before")
    @classmethod
    def _dst(cls, v: Any) -> Any:
        if not isinstance(v, str) or len(v) > 45:
            raise ValueError("expected an IPv4 or IPv6 address")
        return _address(v)

    @model_validator(mode="after")
    def _order(self) -> FlowRecord:
        if self.last_seen < self.first_seen:
            raise ValueError("last_seen is before first_seen")
        return self

    def key(self) -> tuple:
        """What the server merges on, besides the workload and the hour."""
        return (self.login_uid, self.user, self.dst, self.proto, self.port,
                self.verdict, self.rule)

    def wire(self) -> dict:
        d = self.model_dump()
        d["first_seen"], d["last_seen"] = iso(self.first_seen), iso(self.last_seen)
        return d


class FlowBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1]
    workload: Annotated[str, _text(255)]
    dropped: int = Field(default=0, ge=0, le=1 << 53)
    records: list[FlowRecord] = Field(max_length=MAX_BATCH_RECORDS)

    @field_validator("workload")
    @classmethod
    def _workload(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected a non-empty workload name")
        return v
