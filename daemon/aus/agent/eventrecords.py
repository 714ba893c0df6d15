"""One flow record per kernel flow event: what ausd hands its flow sinks
until events are aggregated into windows (aus.agent.flowrecords)."""

from __future__ import annotations

import datetime as _dt

from pydantic import ValidationError

from ..core.contract import RULE_BASELINE
from ..core.flowrecord import PROTOS, FlowRecord

_VERDICTS = {"allow": "allowed", "deny": "denied", "audit": "would_deny"}


def record_of(ev: dict, user: str, groups: tuple[str, ...]) -> FlowRecord | None:
    """The record of one decoded event (aus.agent.flows.decode); None for
    an event that makes no valid record (no login UID, say)."""
    t = _dt.datetime.fromtimestamp(ev["time"], _dt.timezone.utc)
    rule = "baseline" if ev["rule_id"] == RULE_BASELINE else (ev["rule"] or "")
    try:
        return FlowRecord(
            login_uid=ev["login_uid"], user=user, groups=list(groups)[:64],
            process=ev["comm"][:64], dst=ev["dst"],
            proto=ev["proto"] if ev["proto"] in PROTOS else "other",
            port=ev["dport"] if ev["proto"] in ("tcp", "udp") else 0,
            verdict=_VERDICTS.get(ev["verdict"], "denied"), rule=rule[:64],
            first_seen=t.isoformat(), last_seen=t.isoformat(), count=1)
    except ValidationError:
        return None
