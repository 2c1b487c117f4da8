"""Hot-SKU splitting on the local Redis Cluster: one hot SKU as one bucket (K = 1) against three (K = 3).

A flash sale on one SKU sends every reservation to the one primary serving that SKU's shard. Split over
three buckets, on shards served by the three different primaries, the same sale is spread over all three.
Both SKUs live on the same six-node cluster (three primaries with a replica each, replies after WAIT 1 as
in production), and are measured in interleaved rounds in this run:

- `K=1`: the SKU as it is, every hold on one primary;
- `K=3`: the SKU split with `Splitter.put_split(..., 3)`, buyers routed by user over the three buckets.

Each round reserves ROUND_CALLS single-unit holds through StockService in this process from CONCURRENCY
concurrent buyers. Prints the median reservations/s of each, the ratio K=3 / K=1, and how the K=3 holds
spread over the primaries. On this 2-core machine the client and all six servers share the cores, so the
ratio shows the cost or gain of the routing here, not what three primaries on their own machines give.

    make bench-split     # ~1 min, 127.0.0.1 only; stops every server it started
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from contextlib import ExitStack

from redis.asyncio import Redis
from redis.crc import key_slot

from app.stock.buckets import SplitMap, bucket_sku
from app.stock.keys import KeySpace
from app.stock.schemas import ReservationItem, ReservationRequest, SkuSettings
from app.stock.service import StockService
from app.stock.splitting import Splitter
from app.store.local_cluster import LocalCluster
from app.store.postgres import apply_migrations, create_pool
from app.store.redis import connect_redis
from app.store.scripts import Scripts
from app.worker.ledger import PostgresLedger
from bench.servers import workspace

SHARDS = 16
TENANT = "default"
BUCKETS = 3
ROUNDS = 5
ROUND_CALLS = 4_000
CONCURRENCY = 64
UNITS = 10_000_000


def primary_of(cluster: LocalCluster, keys: KeySpace, sku: str) -> int:
    return cluster.primary_port_of_slot(key_slot(keys.events(keys.shard_of(TENANT, sku)).encode()))


def spread_name(cluster: LocalCluster, keys: KeySpace) -> str:
    """A SKU name whose K buckets fall on K different primaries (shards i apart need not)."""
    for i in range(1000):
        name = f"hot-{i}"
        if len({primary_of(cluster, keys, bucket_sku(name, b)) for b in range(BUCKETS)}) == BUCKETS:
            return name
    raise LookupError("no SKU name spreads its buckets over every primary")


async def one_round(service: StockService, sku: str, round_no: int) -> float:
    async def buyer(first: int) -> None:
        for i in range(first, ROUND_CALLS, CONCURRENCY):
            request = ReservationRequest(user_id=f"r{round_no}-{i}", items=[ReservationItem(sku=sku, quantity=1)])
            await service.reserve(TENANT, request)

    started = time.perf_counter()
    await asyncio.gather(*(buyer(k) for k in range(CONCURRENCY)))
    return ROUND_CALLS / (time.perf_counter() - started)


async def main() -> int:
    with ExitStack() as stack:
        ws = workspace(stack)
        cluster = LocalCluster(ws.work / "cluster")
        stack.callback(cluster.stop)
        cluster.start()
        pg = await create_pool(ws.database_url, max_size=4)
        await apply_migrations(pg)
        await pg.execute("TRUNCATE sku_split, bucket_move")
        keys = KeySpace(SHARDS)
        redis: Redis = connect_redis(cluster.url)
        await redis.flushall()
        for shard in keys.all_shards():
            await redis.set(keys.ready(shard), '{"source": "bench"}')
        scripts = Scripts(redis, wait_replicas=1)
        await scripts.load()
        splits = SplitMap(redis, pg, keys)
        service = StockService(redis, scripts, keys, PostgresLedger(pg), idempotency_ttl_seconds=3600, splits=splits)
        service.splitter = Splitter(service, pg, splits, 3600)
        hot = spread_name(cluster, keys)
        single = "one-bucket"
        for sku in (single, hot):
            await service.put_sku(TENANT, sku, SkuSettings(on_hand=UNITS, hold_ttl_seconds=3600))
        state = await service.splitter.put_split(TENANT, hot, BUCKETS)
        assert state.split is not None
        rates: dict[str, list[float]] = {"K=1": [], f"K={BUCKETS}": []}
        for round_no in range(ROUNDS):
            for name, sku in (("K=1", single), (f"K={BUCKETS}", hot)):
                await one_round(service, sku, round_no)  # warm: pools, script caches
                rates[name].append(await one_round(service, sku, round_no + 100))
        state = await service.get_sku(TENANT, hot)
        assert state.split is not None
        held_on = Counter(
            {primary_of(cluster, keys, bucket_sku(hot, b.bucket)): b.held for b in state.split.per_bucket}
        )
        one = statistics.median(rates["K=1"])
        print(f"one hot SKU on the local six-node cluster: {ROUND_CALLS} holds x {ROUNDS} rounds, {CONCURRENCY} buyers")
        print("| SKU | reservations/s (median) | rounds | vs K=1 |")
        print("| --- | ---: | --- | ---: |")
        for name, values in rates.items():
            median = statistics.median(values)
            shown = ", ".join(f"{v:,.0f}" for v in values)
            print(f"| {name} | {median:,.0f} | {shown} | {median / one:.2f}x |")
        single_port = primary_of(cluster, keys, single)
        print(f"K=1: every hold on the primary at port {single_port}")
        print(f"K={BUCKETS}: holds per primary port: " + ", ".join(f"{p}: {n:,}" for p, n in sorted(held_on.items())))
        await redis.aclose()
        await pg.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
