"""Persists stream events into the ``stock_movement`` ledger.

One statement per batch (``INSERT ... SELECT FROM unnest(...)``: the batch travels as 12 arrays, one round
trip) inside the caller's transaction, idempotent on ``(shard, event_id)``: an event delivered twice (a
worker crashed between commit and XACK, or a reclaimed entry) is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

INSERT_MOVEMENTS = """
INSERT INTO stock_movement (shard, event_id, tenant, sku, kind, quantity, reservation_id, user_id,
                            on_hand_after, held_after, sold_after, occurred_at)
SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],
                     $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::timestamptz[])
ON CONFLICT (shard, event_id) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class StreamEvent:
    shard: int
    event_id: str
    fields: dict[str, str]


async def persist_events(conn: asyncpg.Connection | PoolConnectionProxy, events: list[StreamEvent]) -> int:
    """Writes the events not yet in the ledger; returns how many rows were new."""
    if not events:
        return 0
    columns: list[list[object]] = [[] for _ in range(12)]
    for event in events:
        f = event.fields
        row = (
            event.shard,
            event.event_id,
            f["tenant"],
            f["sku"],
            f["type"],
            int(f["qty"]),
            f.get("res") or None,
            f.get("user") or None,
            int(f["on_hand"]),
            int(f["held"]),
            int(f["sold"]),
            datetime.fromtimestamp(int(f["at"]) / 1000, tz=UTC),
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    status = await conn.execute(INSERT_MOVEMENTS, *columns)
    return int(status.rsplit(" ", 1)[1])
