"""Shard event streams -> webhook outbox: at least once, each webhook event recorded once.

The dispatcher reads every shard stream through its own consumer group (``GROUP``), created at the
stream's end the first time (``$``), so enabling webhooks does not replay a stream's history. For each
batch it works out the webhook events (app/webhooks/rules.py), and writes them with one delivery row per
subscribed, active endpoint of their tenant in one transaction; only then it XACKs. A crash before the
XACK leaves the entries pending; XAUTOCLAIM hands them to a live dispatcher once idle for
``claim_idle_ms``, and replaying them inserts nothing new: event ids come from the entries, and both
tables have unique keys taken with ``ON CONFLICT DO NOTHING``.

Entries that cause nothing (most of them, and all of them while a tenant has no endpoint) are
acknowledged at once without touching PostgreSQL, so the group never holds back the stream trimming of
app/worker/backlog.py, which keeps every entry some group still needs.

A Redis that lost its data lost the groups too (NOGROUP): they are created again from the start of the
new streams (``0``), whose entries all came after the loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.stock.buckets import bucket_sku, parent_sku
from app.stock.clock import now_ms
from app.stock.events import StreamEvent, parse_entries
from app.stock.keys import KeySpace
from app.stock.schemas import available_units
from app.stock.sold_out import COUNTERS
from app.store.cluster import read_group
from app.webhooks.rules import WebhookEvent, low_stock_candidate, webhook_events

log = logging.getLogger(__name__)

GROUP = "webhooks"

SPLITS = """
SELECT s.tenant, s.sku, s.highest
FROM sku_split s JOIN unnest($1::text[], $2::text[]) AS x(tenant, sku) ON s.tenant = x.tenant AND s.sku = x.sku
"""

THRESHOLDS = """
SELECT a.tenant, a.sku, a.low_stock_threshold
FROM sku_alert a JOIN unnest($1::text[], $2::text[]) AS x(tenant, sku) ON a.tenant = x.tenant AND a.sku = x.sku
"""

# One statement: the events some active endpoint of their tenant subscribes to, then one delivery per such
# endpoint. An event already recorded (a replayed entry; a reservation's second expired line) inserts
# nothing and so creates no delivery either.
RECORD = """
WITH incoming AS (
    SELECT * FROM json_to_recordset($1::json)
        AS x(id text, tenant text, type text, payload jsonb, shard integer, stream_id text)
), subscribed AS (
    SELECT i.* FROM incoming i
    WHERE EXISTS (SELECT 1 FROM webhook_endpoint e WHERE e.tenant = i.tenant AND e.active AND i.type = ANY (e.events))
), recorded AS (
    INSERT INTO webhook_event (id, tenant, type, payload, shard, stream_id)
    SELECT id, tenant, type, payload, shard, stream_id FROM subscribed
    ON CONFLICT (id) DO NOTHING
    RETURNING id, tenant, type
)
INSERT INTO webhook_delivery (endpoint_id, event_id)
SELECT e.id, r.id FROM recorded r
JOIN webhook_endpoint e ON e.tenant = r.tenant AND e.active AND r.type = ANY (e.events)
ON CONFLICT (endpoint_id, event_id) DO NOTHING
RETURNING id
"""


async def drop_groups(redis: Redis, keys: KeySpace) -> int:
    """Destroys the webhook group on every shard stream (webhooks turned off for good): trimming stops
    waiting for it. Entries it had not recorded are never turned into webhooks. Returns groups destroyed."""
    dropped = 0
    for shard in keys.all_shards():
        with contextlib.suppress(ResponseError):  # no such stream
            dropped += int(await redis.xgroup_destroy(keys.events(shard), GROUP))
    return dropped


class WebhookDispatcher:
    def __init__(
        self,
        redis: Redis,
        pg: asyncpg.Pool,
        keys: KeySpace,
        consumer: str,
        batch: int = 200,
        block_ms: int = 100,
        claim_idle_ms: int = 30_000,
        on_recorded: Callable[[], None] | None = None,
    ) -> None:
        self.redis = redis
        self.pg = pg
        self.keys = keys
        self.consumer = consumer
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.on_recorded = on_recorded  # wakes this process's sender when deliveries were recorded
        self.deliveries_recorded = 0
        self._stream_shard = {keys.events(s): s for s in keys.all_shards()}

    async def ensure_groups(self, start: str = "$") -> None:
        """Creates the group on every shard stream, at its current end unless told otherwise. Idempotent:
        an existing group keeps its position."""
        for stream in self._stream_shard:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(stream, GROUP, id=start, mkstream=True)

    async def step(self, own_pending: bool = False) -> int:
        """Reads up to `batch` entries per shard (new ones, or with `own_pending` those this consumer was
        given and has not acknowledged), records what they cause, then XACKs. Returns entries handled."""
        reply = await read_group(
            self.redis,
            GROUP,
            self.consumer,
            dict.fromkeys(self._stream_shard, "0" if own_pending else ">"),
            count=self.batch,
            block_ms=None if own_pending else self.block_ms,
        )
        events = [e for stream, entries in reply or [] for e in parse_entries(self._stream_shard[stream], entries)]
        # a pending entry trimmed or deleted since it was delivered comes back without fields
        gone = [(stream, str(entry)) for stream, entries in reply or [] for entry, fields in entries if not fields]
        return await self._record_and_ack(events, gone)

    async def reclaim(self) -> int:
        """Takes over entries another dispatcher left pending for over `claim_idle_ms` (it died)."""
        events: list[StreamEvent] = []
        for stream, shard in self._stream_shard.items():
            reply = await self.redis.xautoclaim(
                stream, GROUP, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=self.batch
            )
            events += parse_entries(shard, reply[1])
        return await self._record_and_ack(events, [])

    async def _record_and_ack(self, events: list[StreamEvent], deleted: list[tuple[str, str]]) -> int:
        caused = await self._webhook_events(events) if events else []
        if caused:
            rows = {
                e.id: {
                    "id": e.id,
                    "tenant": e.tenant,
                    "type": e.type.value,
                    "payload": e.body(),
                    "shard": shard,
                    "stream_id": stream_id,
                }
                for e, shard, stream_id in caused
            }
            async with self.pg.acquire() as conn, conn.transaction():
                recorded = await conn.fetch(RECORD, orjson.dumps(list(rows.values())).decode())
            if recorded:
                self.deliveries_recorded += len(recorded)
                if self.on_recorded is not None:
                    self.on_recorded()
        # Only after the commit: a crash before this line leaves the entries pending, recorded once anyway.
        by_stream: dict[str, list[str]] = {}
        for event in events:
            by_stream.setdefault(self.keys.events(event.shard), []).append(event.event_id)
        for stream, entry_id in deleted:  # entries trimmed or deleted while pending: nothing to record
            by_stream.setdefault(stream, []).append(entry_id)
        if by_stream:
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, ids in by_stream.items():
                    pipe.xack(stream, GROUP, *ids)
                await pipe.execute()
        return len(events)

    async def _webhook_events(self, events: list[StreamEvent]) -> list[tuple[WebhookEvent, int, str]]:
        events = await self._as_split_totals(events)
        wanted = {(e.fields.get("tenant", ""), e.fields.get("sku", "")) for e in events if low_stock_candidate(e)}
        thresholds: dict[tuple[str, str], int] = {}
        if wanted:
            tenants, skus = zip(*wanted, strict=True)
            rows = await self.pg.fetch(THRESHOLDS, list(tenants), list(skus))
            thresholds = {(r["tenant"], r["sku"]): r["low_stock_threshold"] for r in rows}
        return [
            (caused, e.shard, e.event_id)
            for e in events
            for caused in webhook_events(e, thresholds.get((e.fields.get("tenant", ""), e.fields.get("sku", ""))))
        ]

    async def _as_split_totals(self, events: list[StreamEvent]) -> list[StreamEvent]:
        """A split SKU's stock alerts are about the SKU, not one of its buckets (app/stock/buckets.py): an
        event that changed a bucket's availability is seen as a change of the SKU's total, so a bucket running
        dry while the others have stock is no `sold_out`, and the alerts name the SKU. The total is read once
        per batch, after the batch's changes, and walked back through them in the order they happened (by
        stream time), so a batch in which every bucket ran dry reports one `sold_out`. Changes made after the
        batch and not read yet are in that total too: they may shift a boundary to the next batch."""
        moved = [e for e in events if _availability(e) is not None]
        if not moved:
            return events
        names = {(e.fields.get("tenant", ""), parent_sku(e.fields.get("sku", ""))) for e in moved}
        tenants, skus = zip(*names, strict=True)
        rows = await self.pg.fetch(SPLITS, list(tenants), list(skus))
        splits = {(r["tenant"], r["sku"]): r["highest"] for r in rows if r["highest"] > 1}
        if not splits:
            return events
        buckets = {key: [(key[0], bucket_sku(key[1], b)) for b in range(highest)] for key, highest in splits.items()}
        every = [name for names_ in buckets.values() for name in names_]
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant, name in every:
                pipe.hmget(self.keys.sku(self.keys.shard_of(tenant, name), tenant, name), COUNTERS)
            read = await pipe.execute()
        now = now_ms()
        counters = {key: [int(v or 0) for v in row] for key, row in zip(every, read, strict=True)}
        total_now = {
            key: sum(
                available_units(on_hand, safety, held, sold, bo, cap, ends, now)
                for on_hand, safety, held, sold, bo, cap, ends in (counters[n] for n in names_)
            )
            for key, names_ in buckets.items()
        }
        ours = sorted(
            (e for e in moved if (e.fields.get("tenant", ""), parent_sku(e.fields.get("sku", ""))) in splits),
            key=lambda e: e.position,
        )
        running = dict(total_now)
        for event in ours:
            before, after = _availability(event) or (0, 0)
            running[_split_key(event)] -= after - before  # the total before this batch's changes
        rewritten: dict[tuple[int, str], StreamEvent] = {}
        for event in ours:
            key = _split_key(event)
            before, after = _availability(event) or (0, 0)
            total_before = max(0, running[key])
            running[key] += after - before
            on_hand, held, sold = (sum(counters[n][i] for n in buckets[key]) for i in (0, 2, 3))
            fields = {
                **event.fields,
                "sku": key[1],
                "av0": str(total_before),
                "av": str(max(0, running[key])),
                "on_hand": str(on_hand),  # the SKU's figures as read, after the batch
                "held": str(held),
                "sold": str(sold),
            }
            rewritten[(event.shard, event.event_id)] = StreamEvent(event.shard, event.event_id, fields)
        return [rewritten.get((e.shard, e.event_id), e) for e in events]

    async def run(self, stop: asyncio.Event, reclaim_every_s: float = 5.0) -> None:
        """Dispatches until `stop` is set; a failing step (PostgreSQL or Redis away) is retried after a
        pause, its entries staying pending on this consumer until a step succeeds."""
        await self.ensure_groups()
        loop = asyncio.get_running_loop()
        next_reclaim = loop.time()
        retry_own = True  # a consumer restarted under its old name starts with its own pending entries
        while not stop.is_set():
            try:
                if loop.time() >= next_reclaim:
                    await self.reclaim()
                    next_reclaim = loop.time() + reclaim_every_s
                if retry_own:
                    retry_own = await self.step(own_pending=True) > 0
                else:
                    await self.step()
            except Exception as exc:
                if isinstance(exc, ResponseError) and ("NOGROUP" in str(exc) or "UNBLOCKED" in str(exc)):
                    log.warning("webhook consumer group gone (Redis lost its data?); creating it again")
                    with contextlib.suppress(Exception):
                        await self.ensure_groups(start="0")
                    continue
                log.exception("webhook dispatch step failed; retrying")
                retry_own = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)


def _availability(event: StreamEvent) -> tuple[int, int] | None:
    """(available before, after) of an event that changed its SKU's availability, else None."""
    av0, av = event.fields.get("av0"), event.fields.get("av")
    if not av0 or not av or av0 == av:
        return None
    return int(float(av0)), int(float(av))


def _split_key(event: StreamEvent) -> tuple[str, str]:
    return event.fields.get("tenant", ""), parent_sku(event.fields.get("sku", ""))
