"""Write-behind benchmark: how far PostgreSQL trails Redis, and how fast the worker can go.

Prints, all measured in this run on this machine:

1. the service's reserve rate: `stockhold serve --workers 2` (worker in process) loaded by wrk for a
   few seconds as `make bench` loads it (installs wrk), 1 line per reservation (= 1 event);
2. write-behind lag under a sustained, paced 2,000 reservations/s for 20 s (reservations made through
   StockService in this process so the pace holds whatever the HTTP client costs; one `stockhold worker`
   process persists): p50 / p99 / max of (row written in PostgreSQL - event time);
3. the worker's maximum sustained rate: a backlog built with no worker running, then drained by one
   `stockhold worker` process: events/s, and its ratio to (1);
4. the ledger insert itself three ways: JSON rows through json_to_recordset (what the worker does), one
   array per column through unnest, COPY into a staging table then INSERT ... ON CONFLICT; median per
   500-event batch and this process's CPU per row.

Targets (issue 3): lag p99 < 1 s; worker rate >= 5x the reserve rate.

    make bench-writebehind          # embedded servers in a temporary directory
    REDIS_URL=... DATABASE_URL=... make bench-writebehind   # or given servers (their stock state is wiped!)

Everything runs on 127.0.0.1, bounded in time (about 90 s), and stops the processes it started.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import asyncpg
import httpx
import orjson
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.stock.schemas import ReservationItem, ReservationRequest, SkuSettings
from app.stock.service import StockService
from app.store.postgres import apply_migrations, create_pool
from app.store.redis import connect_redis
from app.store.scripts import Scripts
from app.worker.backlog import read_backlog
from app.worker.ledger import PostgresLedger
from bench import hotpath
from bench.servers import free_port, stop_process, workspace

SHARDS = 16
TENANT = "default"
SKUS = [f"bench-{i}" for i in range(64)]
PACE_PER_S = 2_000
PACE_SECONDS = 20
BACKLOG_EVENTS = 60_000
HTTP_SECONDS = 5
STATE_TABLES = "stock_movement, sku, reservation, reservation_line, worker_progress"


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT)


async def reset(redis: Redis, pg: asyncpg.Pool, keys: KeySpace) -> None:
    await redis.flushdb()
    await pg.execute(f"TRUNCATE {STATE_TABLES}")
    # an empty PostgreSQL rebuilt into an empty Redis: the markers a rebuild writes
    for shard in keys.all_shards():
        await redis.set(keys.ready(shard), '{"source": "bench"}')


async def unpersisted(redis: Redis, keys: KeySpace) -> int:
    return sum(b.unpersisted for b in await read_backlog(redis, keys))


async def wait_drained(redis: Redis, keys: KeySpace, timeout_s: float) -> float:
    started = time.perf_counter()
    while await unpersisted(redis, keys) > 0:
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"backlog not drained in {timeout_s}s")
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


def request(i: int) -> ReservationRequest:
    return ReservationRequest(user_id=f"u{i}", items=[ReservationItem(sku=SKUS[i % len(SKUS)], quantity=1)])


async def wait_ready(base: str, timeout_s: float = 30) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=1) as c:
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            try:
                if (await c.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{base} not ready in {timeout_s}s")


async def paced(service: StockService, per_s: int, seconds: int) -> tuple[int, float]:
    """Makes `per_s` reservations per second for `seconds`, in 10 ms ticks; returns (made, achieved/s)."""
    tick, per_tick = 0.01, per_s // 100
    made = 0
    started = time.perf_counter()
    for n in range(seconds * 100):
        target = started + n * tick
        await asyncio.sleep(max(0.0, target - time.perf_counter()))
        await asyncio.gather(*(service.reserve(TENANT, request(made + j)) for j in range(per_tick)))
        made += per_tick
    return made, made / (time.perf_counter() - started)


async def as_fast_as_possible(service: StockService, count: int, concurrency: int = 64) -> float:
    started = time.perf_counter()
    next_i = 0

    async def one() -> None:
        nonlocal next_i
        while next_i < count:
            i = next_i
            next_i += 1
            await service.reserve(TENANT, request(1_000_000 + i))

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS movement_staging (LIKE stock_movement INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
COPY_UPSERT = """
INSERT INTO stock_movement (shard, event_id, tenant, sku, kind, quantity, reservation_id, user_id,
                            on_hand_after, held_after, sold_after, occurred_at)
SELECT shard, event_id, tenant, sku, kind, quantity, reservation_id, user_id, on_hand_after, held_after,
       sold_after, occurred_at
FROM movement_staging ON CONFLICT (shard, event_id) DO NOTHING
"""
MOVEMENT_COLUMNS = [
    "shard", "event_id", "tenant", "sku", "kind", "quantity", "reservation_id", "user_id",
    "on_hand_after", "held_after", "sold_after", "occurred_at",
]  # fmt: skip


# The ledger insert as migrations/0003_persist_event_batch.sql does it, and as it was before (unnest)
JSON_INSERT = """
INSERT INTO stock_movement (shard, event_id, tenant, sku, kind, quantity, reservation_id, user_id,
                            on_hand_after, held_after, sold_after, occurred_at)
SELECT shard, event_id, tenant, sku, type, qty, NULLIF(res, ''), NULLIF("user", ''), on_hand, held, sold,
       to_timestamp(at / 1000.0)
FROM json_to_recordset($1::json) AS b(shard int, event_id text, tenant text, sku text, type text, qty bigint,
                                      res text, "user" text, on_hand bigint, held bigint, sold bigint, at bigint)
ON CONFLICT (shard, event_id) DO NOTHING
RETURNING shard
"""
UNNEST_INSERT = """
INSERT INTO stock_movement (shard, event_id, tenant, sku, kind, quantity, reservation_id, user_id,
                            on_hand_after, held_after, sold_after, occurred_at)
SELECT s, e, t, k, kind, q, r, u, oh, h, so, to_timestamp(at / 1000.0)
FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],
            $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[])
     AS b(s, e, t, k, kind, q, r, u, oh, h, so, at)
ON CONFLICT (shard, event_id) DO NOTHING
RETURNING shard
"""


async def insert_variants(pg: asyncpg.Pool, batches: int = 40, size: int = 500) -> dict[str, tuple[float, float]]:
    """The ledger insert three ways: JSON rows through json_to_recordset (what the worker does), one array
    per column through unnest (what it did before), COPY into a staging table then upsert. Per variant,
    the median ms per batch and this process's CPU µs per row (encoding included). Only the
    stock_movement insert differs; the projections are left out."""
    from datetime import UTC, datetime

    def fields(b: int, variant: int) -> list[dict[str, object]]:
        """A batch as the worker reads it from the streams: every value a string, times in ms."""
        ms = 1_800_000_000_000 + variant * 10_000_000 + b * 1000
        return [
            {"shard": i % SHARDS, "event_id": f"{ms}-{i}", "tenant": TENANT, "sku": "x", "type": "held",
             "qty": "1", "res": "r", "user": "u", "on_hand": "9", "held": "1", "sold": "0", "at": str(ms)}
            for i in range(size)
        ]  # fmt: skip

    def as_tuples(batch: list[dict[str, object]]) -> list[tuple[object, ...]]:
        return [(f["shard"], f["event_id"], f["tenant"], f["sku"], f["type"], int(str(f["qty"])), f["res"],
                 f["user"], int(str(f["on_hand"])), int(str(f["held"])), int(str(f["sold"])), int(str(f["at"])))
                for f in batch]  # fmt: skip

    async def json_rows(conn: asyncpg.Connection, batch: list[dict[str, object]]) -> None:
        await conn.fetch(JSON_INSERT, orjson.dumps(batch).decode())

    async def arrays(conn: asyncpg.Connection, batch: list[dict[str, object]]) -> None:
        await conn.fetch(UNNEST_INSERT, *(list(column) for column in zip(*as_tuples(batch), strict=True)))

    async def copy(conn: asyncpg.Connection, batch: list[dict[str, object]]) -> None:
        records = [(*r[:11], datetime.fromtimestamp(int(str(r[11])) / 1000, tz=UTC)) for r in as_tuples(batch)]
        await conn.execute(STAGING)
        await conn.copy_records_to_table("movement_staging", records=records, columns=MOVEMENT_COLUMNS)
        await conn.execute(COPY_UPSERT)

    variants = {"json_to_recordset": json_rows, "unnest arrays": arrays, "COPY + upsert": copy}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    async with pg.acquire() as conn:
        for b in range(batches):
            for v, (name, insert) in enumerate(variants.items()):
                batch = fields(b, v)
                t, c = time.perf_counter(), time.process_time()
                async with conn.transaction():
                    await insert(conn, batch)
                wall[name].append((time.perf_counter() - t) * 1000)
                cpu[name].append((time.process_time() - c) * 1e6 / size)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in variants}


async def main() -> None:
    with ExitStack() as stack:
        ws = workspace(stack)
        work, redis_url, database_url = ws.work, ws.redis_url, ws.database_url
        env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "STOCKHOLD_SHARDS": str(SHARDS)}
        env["STOCKHOLD_REQUIRE_AUTH"] = "false"  # wrk sends no key
        print(f"servers: {redis_url} and PostgreSQL at {database_url.split('@')[-1]}", flush=True)

        keys = KeySpace(SHARDS)
        redis = connect_redis(redis_url, pool_size=256)
        pg = await create_pool(database_url, max_size=8)
        await apply_migrations(pg)
        scripts = Scripts(redis)
        await scripts.load()
        service = StockService(redis, scripts, keys, PostgresLedger(pg), idempotency_ttl_seconds=3600)

        async def fresh_catalogue() -> None:
            await reset(redis, pg, keys)
            for sku in SKUS:
                await service.put_sku(TENANT, sku, SkuSettings(on_hand=10_000_000))

        try:
            # 1. the service's reserve rate over HTTP, loaded by wrk as `make bench` loads it
            await fresh_catalogue()
            port = free_port()
            server = start(["serve", "--port", str(port), "--workers", "2"], env, work / "serve.log")
            try:
                base = f"http://127.0.0.1:{port}"
                await wait_ready(base)
                os.environ["BENCH_SKU"] = SKUS[0]  # the SKU bench/wrk/reserve.lua reserves
                script = hotpath.wrk_script(work)
                hotpath.wrk(base, "stockhold", hotpath.WARMUP_SECONDS, script)  # connections, pools, caches
                http = hotpath.wrk(base, "stockhold", HTTP_SECONDS, script)
                http_rate = http.rps
            finally:
                stop_process(server)
            print(f"1. reserve rate, HTTP, serve --workers 2 (worker in process), wrk -t{hotpath.THREADS} "
                  f"-c{hotpath.CONNECTIONS}, {HTTP_SECONDS}s: {http_rate:,.0f} reservations/s, "
                  f"p99 {http.p99_ms:.1f} ms", flush=True)  # fmt: skip

            # 2. lag under a paced 2,000 reservations/s with one worker process
            await fresh_catalogue()
            worker = start(["worker", "--name", "bench-lag"], env, work / "worker-lag.log")
            try:
                await asyncio.sleep(2)  # the worker connects and creates its groups
                made, achieved = await paced(service, PACE_PER_S, PACE_SECONDS)
                await wait_drained(redis, keys, timeout_s=30)
            finally:
                stop_process(worker)
            lags = [
                float(r["lag_ms"])
                for r in await pg.fetch(
                    "SELECT extract(epoch FROM recorded_at - occurred_at) * 1000 AS lag_ms FROM stock_movement "
                    "WHERE kind = 'held'"
                )
            ]
            lags.sort()
            p = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))]  # noqa: E731
            print(
                f"2. write-behind lag at {achieved:,.0f} reservations/s for {PACE_SECONDS}s ({made:,} events, "
                f"{len(lags):,} persisted): p50 {p(0.50):.0f} ms, p99 {p(0.99):.0f} ms, max {lags[-1]:.0f} ms "
                f"(target p99 < 1000 ms)",
                flush=True,
            )

            # 3. the worker's maximum rate on a backlog
            await fresh_catalogue()
            worker_groups = start(["worker", "--name", "bench-groups"], env, work / "worker-groups.log")
            await asyncio.sleep(2)
            stop_process(worker_groups)  # groups exist; from here on, events wait in the streams
            made_rate = await as_fast_as_possible(service, BACKLOG_EVENTS)
            backlog = await unpersisted(redis, keys)
            worker = start(["worker", "--name", "bench-drain", "--batch", "1000"], env, work / "worker-drain.log")
            try:
                drain_s = await wait_drained(redis, keys, timeout_s=120)
            finally:
                stop_process(worker)
            worker_rate = backlog / drain_s
            print(
                f"3. worker drain: {backlog:,} events in {drain_s:.2f}s = {worker_rate:,.0f} events/s "
                f"(process start included); {worker_rate / http_rate:.1f}x the HTTP reserve rate "
                f"(target >= 5x); {worker_rate / made_rate:.1f}x the in-process script rate "
                f"({made_rate:,.0f}/s, no HTTP)",
                flush=True,
            )

            # 4. three ways to send the ledger insert
            await pg.execute(f"TRUNCATE {STATE_TABLES}")
            variants = await insert_variants(pg)
            print("4. ledger insert of 500 events, median of 40 (ms per batch; this process's CPU per row):")
            for name, (ms, cpu_us) in variants.items():
                print(f"   {name:<18} {ms:6.2f} ms  {cpu_us:5.1f} µs/row", flush=True)
        finally:
            await reset(redis, pg, keys)
            await redis.aclose()
            await pg.close()


if __name__ == "__main__":
    asyncio.run(main())
