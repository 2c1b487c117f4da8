"""Persists stream events into PostgreSQL: the ``stock_movement`` ledger and the projections the system
of record keeps beside it (``sku``, ``reservation``, ``reservation_line``, ``worker_progress``).

A batch is one call of ``persist_event_batch()`` (migrations/0003_persist_event_batch.sql, wrapped by
0004_purchase_policy.sql to store the purchase policy, by 0007_presale.sql to store the presale and
the backordered units, and by 0009_channels.sql to store the sales channels): the statements for every
table run there, in one round trip whatever the batch's size. Python builds the rows (the newest event
per SKU, the lines merged per reservation) and sorts each table's by primary key; the function writes
the tables in a fixed sequence, so concurrent writers (several workers, confirm's write-through) lock
rows in one global order and wait for each other but never deadlock. Everything is
idempotent on the event id: the ledger row is ``ON CONFLICT DO NOTHING`` and every projection row records
the id (ms, seq) of the event it reflects and only takes a later one, so an event delivered twice, or out
of order (a redelivered batch, a confirm written through before the worker reached its hold), leaves the
same state. `make bench-writebehind` compares the ledger insert three ways (JSON rows as here, one array
per column for unnest, COPY into a staging table then upsert).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from app.stock.errors import LedgerUnavailable
from app.stock.events import RESERVE_TYPES, ReservationRecord, StreamEvent
from app.stock.policy import POLICY_FIELDS
from app.stock.presale import PRESALE_FIELDS

log = logging.getLogger(__name__)

Conn = asyncpg.Connection | PoolConnectionProxy

# How long confirm waits for PostgreSQL before answering 503: well under a payment webhook's timeout.
WRITE_THROUGH_TIMEOUT_S = 3.0

# The whole batch in one round trip (migrations/0003_persist_event_batch.sql holds the statements): each
# table's rows travel as one JSON array of objects, read back by json_to_recordset(). asyncpg's array
# encoding checks every element against the collections ABCs: measured, 10.7 µs of the worker's CPU per
# 12-column row against 1.5 µs for orjson plus json_to_recordset, whose server side is cheaper too (5.3
# against 14.9 µs a row, wall). Numbers may travel as the stream's strings: SQL casts them, and keys a
# statement does not name are ignored.
PERSIST_BATCH = "SELECT persist_event_batch($1::json, $2::json, $3::json, $4::json, $5::json)"


def _json(rows: Sequence[object]) -> str:
    return orjson.dumps(rows).decode()


async def persist_events(
    conn: Conn,
    events: Sequence[StreamEvent],
    *,
    progress: bool = False,
    documents: Sequence[ReservationRecord] = (),
) -> int:
    """Writes the events into the ledger and the projections, atomically (one statement). Returns how
    many ledger rows were new. `progress`: also advance worker_progress (the worker's own batches).
    `documents`: reservations to record as well (confirm's write-through has the document at hand)."""
    if not events and not documents:
        return 0
    ordered = sorted(events, key=lambda e: (e.shard, e.position))
    # a movement is the event's fields as the stream holds them, with where it was found
    movements = [{**e.fields, "shard": e.shard, "event_id": e.event_id} for e in ordered]
    lines, reservations = _reservation_rows(ordered)
    for r in documents:
        document = _document(r.id, r.tenant, r.user_id, r.channel, r.items, r.created_at_ms, r.expires_at_ms)
        reservations.setdefault(r.id, document)
    progress_rows = None
    if progress:
        last: dict[int, StreamEvent] = {e.shard: e for e in ordered}  # ordered: the newest per shard wins
        newest = [(shard, e.event_id, *e.position) for shard, e in sorted(last.items())]
        names = ("shard", "last_event_id", "last_event_ms", "last_event_seq")
        progress_rows = _json([dict(zip(names, row, strict=True)) for row in newest])
    new_rows = await conn.fetchval(
        PERSIST_BATCH,
        _json(movements),
        _json(_sku_rows(ordered)),
        _json([lines[k] for k in sorted(lines)]),
        _json([reservations[k] for k in sorted(reservations)]),
        progress_rows,
    )
    return int(new_rows)


def _document(
    rid: str, tenant: str, user_id: str, channel: str | None, items: object, created_ms: object, expires_ms: object
) -> dict[str, object]:
    return {
        "id": rid,
        "tenant": tenant,
        "user_id": user_id,
        "channel": channel,
        "items": items,
        "created_at_ms": created_ms,
        "expires_at_ms": expires_ms,
    }


def _sku_rows(ordered: Sequence[StreamEvent]) -> list[dict[str, object]]:
    newest: dict[tuple[str, str], StreamEvent] = {}
    settings: dict[tuple[str, str], StreamEvent] = {}
    for e in ordered:  # per SKU, events come in stream order: the last one seen is the newest
        key = (e.fields["tenant"], e.fields["sku"])
        newest[key] = e
        if e.fields["type"] == "sku_set":
            settings[key] = e
    rows = []
    for key, e in sorted(newest.items()):
        f = e.fields
        row: dict[str, object] = {
            "tenant": key[0],
            "sku": key[1],
            "on_hand": f["on_hand"],
            "held": f["held"],
            "sold": f["sold"],
            "backordered": f.get("bo"),  # None: an event from before presales; the column keeps its value
            "event_ms": e.position[0],
            "event_seq": e.position[1],
        }
        if s := settings.get(key):
            sf = s.fields
            row |= {
                "safety_stock": sf["safety_stock"],
                "mode": sf.get("mode"),
                "hold_ttl_seconds": sf["hold_ttl_seconds"],
                "per_user_limit": sf["per_user_limit"],
                # events from before purchase policies carry none: every rule off (0)
                "policy": {f: int(sf.get(f) or 0) for f in POLICY_FIELDS},
                "presale": _presale(sf),
                "settings_event_ms": s.position[0],
                "settings_event_seq": s.position[1],
            }
        rows.append(row)
    return rows


def _presale(fields: dict[str, str]) -> dict[str, int] | None:
    """sku.presale from a sku_set event: its flat fields, or None for no presale (cap 0, or an event from
    before presales)."""
    values = {f: int(fields.get(f) or 0) for f in PRESALE_FIELDS}
    return values if values["presale_cap"] > 0 else None


def _reservation_rows(
    ordered: Sequence[StreamEvent],
) -> tuple[dict[tuple[str, str], dict[str, object]], dict[str, dict[str, object]]]:
    """Reservation lines by (reservation, SKU) and reservation documents by id, from the events."""
    lines: dict[tuple[str, str], dict[str, object]] = {}
    docs: dict[str, dict[str, object]] = {}
    for e in ordered:
        f = e.fields
        rid, kind = f.get("res"), f["type"]
        if not rid or "st" not in f:
            continue
        key = (rid, f["sku"])
        line = lines.get(key)
        if line is None:
            # A line first seen through a later event (a confirm written through before its hold
            # landed): held is a guess that its reserve event corrects when it arrives. No deadline or
            # creation (null): the upsert keeps what PostgreSQL has.
            line = lines[key] = {
                "reservation_id": rid,
                "sku": f["sku"],
                "shard": e.shard,
                "tenant": f["tenant"],
                "user_id": f["user"],
                "quantity": f["qty"],
                "held": kind != "sold",
            }
        if kind in RESERVE_TYPES:
            deadline = f.get("exp") or 0
            line |= {"held": kind == "held", "expires_at_ms": deadline, "created_at_ms": f["at"]}
            if "doc" in f:
                doc = orjson.loads(f["doc"])
                user, channel, items = doc["user_id"], doc.get("channel"), doc["items"]
                docs[rid] = _document(rid, f["tenant"], user, channel, items, f["at"], deadline)
        line |= {"status": f["st"], "status_before": f.get("pst"), "confirmed_how": f.get("cf")}
        # the line's backordered units after this event, and its units from its channel's quota (set by
        # reserve and confirm): kept from an earlier event of the batch when this one does not say
        if "lbo" in f:
            line["backordered"] = f["lbo"]
        if "lq" in f:
            line["from_quota"] = f["lq"]
        line["event_ms"], line["event_seq"] = e.position
    return lines, docs


class PostgresLedger:
    """The SaleLedger confirm writes through: one transaction per confirmation, bounded in time."""

    def __init__(self, pool: asyncpg.Pool, timeout_s: float = WRITE_THROUGH_TIMEOUT_S) -> None:
        self.pool = pool
        self.timeout_s = timeout_s

    async def record_confirmation(self, events: Sequence[StreamEvent], reservation: ReservationRecord) -> None:
        try:
            await asyncio.wait_for(self._write(events, reservation), timeout=self.timeout_s)
        except Exception as exc:  # whatever failed, the confirmation is not known to be durable
            log.warning("confirmation of %s not written to PostgreSQL: %r", reservation.id, exc)
            raise LedgerUnavailable(
                "the confirmation could not be recorded in the system of record (PostgreSQL); it was not made. "
                "Retry shortly: the hold keeps its deadline meanwhile"
            ) from exc

    async def _write(self, events: Sequence[StreamEvent], r: ReservationRecord) -> None:
        async with self.pool.acquire() as conn:
            await persist_events(conn, events, documents=[r])
