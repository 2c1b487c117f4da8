"""Reserve throughput on one Redis against a local Redis Cluster, with and without WAIT.

Three targets, measured in interleaved rounds in this run on this machine:

- `single`: one Redis server (the embedded one, or REDIS_URL);
- `cluster`: a local six-node cluster (three primaries with a replica each), replies after WAIT 1 (the default);
- `cluster-nowait`: the same cluster with STOCKHOLD_REDIS_WAIT_REPLICAS=0, to show what WAIT costs.

Each round reserves ROUND_CALLS single-unit holds through StockService in this process, from CONCURRENCY
concurrent buyers, over SKUS SKUs spread over every shard. Prints the median reservations/s per target and
the ratios against `single`. What it shows is the client-side cost of the topology on this 2-core machine:
all six cluster nodes share the same cores as the client, so it is no forecast of a cluster on its own
machines.

    make bench-cluster     # ~1 min, 127.0.0.1 only; stops every server it started
"""

from __future__ import annotations

import asyncio
import statistics
import time
from contextlib import ExitStack

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.stock.schemas import ReservationItem, ReservationRequest, SkuSettings
from app.stock.service import StockService
from app.store.local_cluster import LocalCluster
from app.store.postgres import apply_migrations, create_pool
from app.store.redis import connect_redis
from app.store.scripts import Scripts
from app.worker.ledger import PostgresLedger
from bench.servers import workspace

SHARDS = 16
TENANT = "default"
SKUS = [f"bench-{i}" for i in range(48)]
ROUNDS = 3
ROUND_CALLS = 6_000
CONCURRENCY = 64


async def prepare(redis: Redis, keys: KeySpace, service: StockService) -> None:
    await redis.flushdb()
    async with redis.pipeline(transaction=False) as pipe:
        for shard in keys.all_shards():
            pipe.set(keys.ready(shard), '{"source": "bench"}')
        await pipe.execute()
    for sku in SKUS:
        await service.put_sku(TENANT, sku, SkuSettings(on_hand=10_000_000, hold_ttl_seconds=3600))


async def one_round(service: StockService, round_no: int) -> float:
    async def buyer(first: int) -> None:
        for i in range(first, ROUND_CALLS, CONCURRENCY):
            sku = SKUS[i % len(SKUS)]
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
        keys = KeySpace(SHARDS)
        targets: dict[str, tuple[Redis, StockService]] = {}
        for name, url, wait in (
            ("single", ws.redis_url, 1),
            ("cluster", cluster.url, 1),
            ("cluster-nowait", cluster.url, 0),
        ):
            redis = connect_redis(url)
            scripts = Scripts(redis, wait_replicas=wait)
            await scripts.load()
            service = StockService(redis, scripts, keys, PostgresLedger(pg), idempotency_ttl_seconds=3600)
            targets[name] = (redis, service)
        await prepare(targets["single"][0], keys, targets["single"][1])
        await prepare(targets["cluster"][0], keys, targets["cluster"][1])
        rates: dict[str, list[float]] = {name: [] for name in targets}
        for round_no in range(ROUNDS):
            for name, (_, service) in targets.items():
                await one_round(service, round_no)  # warm: pools, script caches
                rates[name].append(await one_round(service, round_no + 100))
        print(f"reserve through StockService, {ROUND_CALLS} calls x {ROUNDS} rounds, {CONCURRENCY} concurrent buyers")
        print("| target | reservations/s (median) | rounds | vs single |")
        print("| --- | ---: | --- | ---: |")
        single = statistics.median(rates["single"])
        for name, values in rates.items():
            median = statistics.median(values)
            shown = ", ".join(f"{v:,.0f}" for v in values)
            print(f"| {name} | {median:,.0f} | {shown} | {median / single:.2f}x |")
        for redis, _ in targets.values():
            await redis.aclose()
        await pg.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
