"""The audit trail: every change to an org's configuration, with who made
it, when, and the object before and after.

A change is recorded in the same transaction as the change itself (a
change that rolls back leaves no record, and no change goes unrecorded),
and logged as one line on the ``aus.audit`` logger once that transaction
has committed (a refused change logs nothing). What each record holds is
in docs/audit.md; the snapshots of each kind of object in ``snapshots``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from sqlalchemy import event
from sqlalchemy.orm import Session

from .db import ApiKey, AuditEvent

log = logging.getLogger("aus.audit")
_PENDING = "aus.audit.pending"   # Session.info key: log lines waiting for the commit

CLI = "cli"   # the key id recorded for the local ``aus-server`` command


@dataclass(frozen=True)
class Actor:
    """Who makes a change: an API key's id and its label, or :data:`CLI`."""
    key_id: str
    label: str = ""


def actor(session: Session, key_id: str | None) -> Actor:
    """The actor for ``key_id`` with the key's label as it is now."""
    if not key_id:
        return Actor(CLI, "aus-server command")
    key = session.get(ApiKey, key_id)
    return Actor(key_id, key.label if key is not None else "")


def record(session: Session, org_id: str, who: Actor | str | None, action: str,
           target: str = "", *, before=None, after=None) -> AuditEvent:  # noqa: ANN001 - JSON
    """Add one audit event to ``session`` (committed with the change) and
    log it once the change is committed. ``who`` is an :class:`Actor` or a
    key id."""
    if not isinstance(who, Actor):
        who = actor(session, who)
    row = AuditEvent(org_id=org_id, key_id=who.key_id, key_label=who.label,
                     action=action, target=target, before=before, after=after)
    session.add(row)
    session.flush()
    session.info.setdefault(_PENDING, []).append(
        (row.id, org_id, who.key_id, json.dumps(who.label), action, json.dumps(target)))
    return row


@event.listens_for(Session, "after_commit")
def _log_committed(session: Session) -> None:
    for line in session.info.pop(_PENDING, ()):
        log.info("audit id=%s org=%s key=%s label=%s action=%s target=%s", *line)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)
