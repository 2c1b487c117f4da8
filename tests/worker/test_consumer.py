"""The write-behind worker: every event reaches the ledger exactly once, through redelivery, reclaim
and racing workers; and replaying the ledger gives Redis's counters."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import asyncpg
import pytest
from redis.asyncio import Redis

from app.stock.errors import InsufficientStock
from app.stock.events import StreamEvent
from app.stock.keys import KeySpace
from app.stock.schemas import Adjustment, SkuSettings
from app.stock.service import StockService
from app.stock.sweeper import ExpirySweeper
from app.store.cluster import read_group
from app.worker.consumer import GROUP, WriteBehindWorker
from app.worker.ledger import persist_events
from tests.helpers import req
from tests.stock.test_cross_shard import skus_on_distinct_shards

TENANT = "default"

# What each event type does to (on_hand, held, sold): the table beside emit() in lua/includes/common.lua.
EFFECT = {
    "adjusted": (1, 0, 0),
    "held": (0, 1, 0),
    "confirmed": (0, -1, 1),
    "sold": (0, 0, 1),
    "released": (0, -1, 0),
    "expired": (0, -1, 0),
    "undone": (0, -1, 0),
    "unconfirmed": (0, 1, -1),
    "unsold": (0, 0, -1),
    "pending": (0, 0, 0),
    "cancelled": (0, 0, 0),
    "lapsed": (0, 0, 0),
}


def worker(redis: Redis, pg: asyncpg.Pool, keys: KeySpace, name: str, **kw: int) -> WriteBehindWorker:
    return WriteBehindWorker(redis, pg, keys, consumer=name, batch=50, block_ms=10, **kw)


async def workload(service: StockService, sweeper: ExpirySweeper, keys: KeySpace) -> list[str]:
    """Every kind of event: catalogue changes, holds, sales, releases, expiry, both compensations."""
    a, b, c, d = skus_on_distinct_shards(keys, 4)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=20, per_user_limit=5))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=3, mode="on_payment"))
    await service.put_sku(TENANT, c, SkuSettings(on_hand=2))
    await service.put_sku(TENANT, d, SkuSettings(on_hand=4, mode="on_payment"))
    await service.adjust(TENANT, a, Adjustment(delta=5, reason="restock"))
    for i in range(12):
        held = await service.reserve(TENANT, req(f"u{i}", (a, 1 + i % 2)))
        if i % 3 == 0:
            await service.confirm(TENANT, held.id)
        elif i % 3 == 1:
            await service.release(TENANT, held.id)
    cross = await service.reserve(TENANT, req("v", (a, 1), (b, 2)))
    with pytest.raises(InsufficientStock):
        await service.reserve(TENANT, req("w", (a, 1), (c, 5)))  # undone
    await service.reserve(TENANT, req("x", (b, 2)))
    paid_late = await service.reserve(TENANT, req("p", (d, 1), (b, 1)))  # pending: b not sold out yet
    rival = await service.reserve(TENANT, req("y", (b, 3)))
    await service.confirm(TENANT, rival.id)
    with pytest.raises(InsufficientStock):
        await service.confirm(TENANT, cross.id)  # a's hold confirmed, then unconfirmed
    with pytest.raises(InsufficientStock):
        await service.confirm(TENANT, paid_late.id)  # d deducted directly, then unsold
    await service.release(TENANT, (await service.reserve(TENANT, req("q", (d, 1)))).id)  # cancelled
    await service.reserve(TENANT, req("z", (c, 2)))
    await sweeper.sweep_once(now=10**13)  # expired and lapsed
    return [a, b, c, d]


async def total_events(redis: Redis, keys: KeySpace) -> int:
    """Events ever added to the shard streams (not their length: workers trim what they persisted)."""
    total = 0
    for s in keys.all_shards():
        if await redis.exists(keys.events(s)):
            total += (await redis.xinfo_stream(keys.events(s)))["entries-added"]
    return total


async def ledger_rows(pg: asyncpg.Pool) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM stock_movement"))


async def pending(redis: Redis, keys: KeySpace) -> int:
    counts = [(await redis.xpending(keys.events(s), GROUP))["pending"] for s in keys.all_shards()]
    return sum(counts)


async def drain(*workers: WriteBehindWorker) -> None:
    while sum(await asyncio.gather(*(w.step() for w in workers))):
        pass


async def test_every_event_once_and_the_ledger_replays_to_redis(
    redis: Redis, pg: asyncpg.Pool, service: StockService, sweeper: ExpirySweeper, keys: KeySpace
) -> None:
    # given a workload that emitted every kind of event before any worker ran
    skus = await workload(service, sweeper, keys)
    emitted = await total_events(redis, keys)
    written_through = await ledger_rows(pg)  # confirm's events, written before it answered
    assert written_through > 0
    w = worker(redis, pg, keys, "w1")
    await w.ensure_groups()

    # when
    await drain(w)

    # then every event is in the ledger once, acknowledged, and the ledger replays to Redis's counters
    assert await ledger_rows(pg) == emitted
    assert w.persisted_total == emitted - written_through
    assert w.acknowledged_total == emitted  # what it handled, written through or not
    assert await pending(redis, keys) == 0
    rows = await pg.fetch("SELECT sku, kind, quantity, on_hand_after FROM stock_movement ORDER BY occurred_at")
    replayed: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in rows:
        counters = replayed[row["sku"]]
        if row["kind"] == "sku_set":
            counters[0] = row["on_hand_after"]
            continue
        for i, factor in enumerate(EFFECT[row["kind"]]):
            counters[i] += factor * row["quantity"]
    for sku in skus:
        state = await service.get_sku(TENANT, sku)
        assert replayed[sku] == [state.on_hand, state.held, state.sold], sku
    kinds = {row["kind"] for row in rows}
    assert kinds == set(EFFECT) | {"sku_set"}, "the workload should exercise every event type"


async def test_a_crash_between_commit_and_ack_is_reclaimed_and_written_once(
    redis: Redis, pg: asyncpg.Pool, service: StockService, sweeper: ExpirySweeper, keys: KeySpace
) -> None:
    await workload(service, sweeper, keys)
    emitted = await total_events(redis, keys)
    written_through = await ledger_rows(pg)
    crashed = worker(redis, pg, keys, "crashed")
    await crashed.ensure_groups()
    # the crashed worker read and committed a batch, then died before XACK
    streams = dict.fromkeys([keys.events(s) for s in keys.all_shards()], ">")
    reply = await read_group(redis, GROUP, "crashed", streams, count=10_000, block_ms=None)  # a cluster too
    shard_of = {keys.events(s): s for s in keys.all_shards()}
    read = [StreamEvent(shard_of[stream], eid, fields) for stream, entries in reply for eid, fields in entries]
    async with pg.acquire() as conn, conn.transaction():
        assert await persist_events(conn, read) == emitted - written_through
    assert len(read) == emitted
    assert await pending(redis, keys) == emitted

    # when another worker takes over what the dead one left pending
    survivor = worker(redis, pg, keys, "survivor", claim_idle_ms=0)
    assert await survivor.reclaim() == emitted

    # then nothing was written twice, and nothing is left pending
    assert await pg.fetchval("SELECT count(*) FROM stock_movement") == emitted
    assert survivor.persisted_total == 0
    assert (survivor.acknowledged_total, crashed.acknowledged_total) == (emitted, 0)
    assert await pending(redis, keys) == 0


async def test_two_workers_racing_write_every_event_once(
    redis: Redis, pg: asyncpg.Pool, service: StockService, sweeper: ExpirySweeper, keys: KeySpace
) -> None:
    first, second = worker(redis, pg, keys, "w1"), worker(redis, pg, keys, "w2")
    await first.ensure_groups()
    stop = asyncio.Event()
    running = [asyncio.create_task(w.run(stop, reclaim_every_s=0.05)) for w in (first, second)]

    # while both consume, the workload runs
    await workload(service, sweeper, keys)
    emitted = await total_events(redis, keys)
    async with asyncio.timeout(10):
        while await pg.fetchval("SELECT count(*) FROM stock_movement") < emitted:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*running)

    assert await pg.fetchval("SELECT count(*) FROM stock_movement") == emitted
    # (the primary key makes a duplicate impossible; the count shows none was lost; the workers wrote
    # what confirm's write-through had not)
    assert 0 < first.persisted_total + second.persisted_total < emitted
    # one consumer group: each entry was handed to one of them, and acknowledged by that one only
    assert first.acknowledged_total + second.acknowledged_total == emitted
    assert await pending(redis, keys) == 0


async def test_a_worker_behind_reads_bigger_batches_until_it_has_caught_up(
    redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    # given 1,000 holds on one SKU (one shard stream) waiting for a worker that reads 50 at a time
    (sku,) = skus_on_distinct_shards(keys, 1)
    await service.put_sku(TENANT, sku, SkuSettings(on_hand=10_000))
    w = WriteBehindWorker(redis, pg, keys, consumer="w1", batch=50, block_ms=10, max_batch=200)
    await w.ensure_groups()
    await w.step()  # the catalogue event
    for i in range(20):
        await asyncio.gather(*(service.reserve(TENANT, req(f"u{i}-{j}", (sku, 1))) for j in range(50)))

    # when it drains them, then the stream goes quiet
    steps = []
    while n := await w.step():
        steps.append(n)
    await service.reserve(TENANT, req("late", (sku, 1)))
    after = await w.step()

    # then each full read doubled the next one up to max_batch, the last partial one reset it, and every
    # hold was persisted once
    assert steps == [50, 100, 200, 200, 200, 200, 50], steps
    assert (after, w.count) == (1, 50)
    assert await pg.fetchval("SELECT count(*) FROM stock_movement WHERE kind = 'held'") == 1001
