"""``POST /api/orgs/{org_id}/flows``: a batch of flow records from a workload.

The body is a :class:`aus.core.flowrecord.FlowBatch` as JSON, sent as is or
with ``Content-Encoding: gzip``. The input gate (:mod:`.intake`) has by then
checked the key and inflated a gzip body with a cap (:data:`MAX_BATCH_BYTES`);
this route parses the batch, validates it against the model (which bounds
every string and number),
merges it and writes it in one transaction (:mod:`.flowstore`). A batch
with any bad record is refused whole (400, naming each record and field)
and stores nothing.

Answers: ``200 {"accepted": n, "rows": m, "expired": k}``: n records
stored as m rows (inserted or merged), k records skipped because their
hour is already past the retention. The batch's ``dropped`` (records the
workload lost before sending) is added to the workload's
``flows_dropped``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import ValidationError

from ..core.flowrecord import MAX_BATCH_BYTES, FlowBatch
from . import metrics
from .api import ApiError, org_auth
from .db import utcnow
from .flowstore import FlowStore, merge_records

router = APIRouter(prefix="/api/orgs/{org_id}", tags=["flows"])

MAX_AHEAD = dt.timedelta(days=1)   # clock skew a workload may have
MAX_FIELDS = 50                    # problems listed in one answer
# Batches parsed and written at once by one process. The others wait as
# bytes: a parsed batch is tens of thousands of objects, and a hundred of
# them alive at once make every garbage collection walk millions.
CONCURRENT_BATCHES = 4


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out or "body"


def _refusal(fields: list[dict]) -> ApiError:
    first = fields[0]
    more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
    return ApiError(400, f"the flow batch is not valid: {first['field']}: {first['message']}{more}",
                    fields[:MAX_FIELDS])


def parse_batch(doc, now: dt.datetime) -> FlowBatch:
    """The batch in ``doc``, or ApiError 400 naming each bad field."""
    try:
        batch = FlowBatch.model_validate(doc)
    except ValidationError as exc:
        fields = [{"field": _field(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        raise _refusal(fields) from None
    ahead = now + MAX_AHEAD
    late = [{"field": f"records[{i}].last_seen",
             "message": "is more than a day ahead of the server's clock"}
            for i, r in enumerate(batch.records) if r.last_seen > ahead]
    if late:
        raise _refusal(late)
    return batch


def _store(request: Request) -> FlowStore:
    return request.app.state.flows


def ingest(store: FlowStore, org_id: str, doc) -> dict:
    now = utcnow()
    batch = parse_batch(doc, now)
    cutoff = store.cutoff(now)
    # A record is stored under the hour it began in; one that began before
    # the cutoff would land in a day retention removes.
    kept = [r for r in batch.records if r.first_seen >= cutoff]
    rows = merge_records(org_id, batch.workload, kept)
    store.write(rows, (org_id, batch.workload, batch.dropped))
    metrics.FLOW_BATCHES.inc()
    metrics.FLOW_RECORDS.labels("accepted").inc(len(kept))
    metrics.FLOW_RECORDS.labels("expired").inc(len(batch.records) - len(kept))
    return {"accepted": len(kept), "rows": len(rows), "expired": len(batch.records) - len(kept)}


@router.post("/flows")
async def post_flows(request: Request, org_id: str = Depends(org_auth)) -> dict:
    """A batch of flow records from a workload: a FlowBatch as JSON
    (aus.core.flowrecord), plain or with Content-Encoding: gzip, at most
    5,000 records and 8 MiB inflated. Answers {"accepted", "rows",
    "expired"}; a malformed batch gets 400 naming each record and field,
    and nothing of it is stored. See docs/flow-ingest.md."""
    body = await request.body()
    if not body.strip():
        raise ApiError(400, "the flow batch is empty: send a FlowBatch as JSON",
                       [{"field": "body", "message": "empty"}])
    if len(body) > MAX_BATCH_BYTES:
        raise ApiError(413, f"the flow batch is larger than {MAX_BATCH_BYTES} bytes")
    async with request.app.state.flow_slots:
        return await asyncio.to_thread(_parse_and_ingest, _store(request), org_id, body)


def _parse_and_ingest(store: FlowStore, org_id: str, body: bytes) -> dict:
    try:
        doc = json.loads(body)
    except RecursionError:
        raise ApiError(400, "the flow batch nests deeper than the parser goes "
                            "(a flow batch nests 4 levels)") from None
    except ValueError as exc:
        raise ApiError(400, f"the flow batch is not JSON: {_json_error(exc)}",
                       [{"field": "body", "message": _json_error(exc)}]) from None
    return ingest(store, org_id, doc)


def _json_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 at byte {exc.start}"
    return str(exc)


def install(app: FastAPI) -> None:
    app.state.flow_slots = asyncio.Semaphore(CONCURRENT_BATCHES)
    app.include_router(router)
