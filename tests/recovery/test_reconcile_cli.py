"""`stockhold reconcile` and `stockhold status` as an operator runs them: real processes against the
session's Redis and PostgreSQL, with the state made in process by the service."""

from __future__ import annotations

import asyncio
import os

import asyncpg
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.stock.schemas import Mode, SkuSettings
from app.stock.service import StockService
from tests.conftest import Servers
from tests.helpers import req
from tests.recovery.test_redis_loss import cli
from tests.stock.test_cross_shard import skus_on_distinct_shards

TENANT = "default"


def env_for(servers: Servers) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        "STOCKHOLD_SHARDS": "16",
    }


async def some_trade(service: StockService, keys: KeySpace) -> tuple[str, str, str]:
    """Holds, sales, a release and a reservation spanning shards; no worker runs, so apart from the
    confirms' write-through every event is still only in the streams. Returns (a, b, a held reservation)."""
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=20, per_user_limit=5))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=8, mode=Mode.ON_PAYMENT))
    held = await service.reserve(TENANT, req("u1", (a, 2)))
    await service.confirm(TENANT, (await service.reserve(TENANT, req("u2", (a, 3), (b, 2)))).id)
    await service.release(TENANT, (await service.reserve(TENANT, req("u3", (a, 1)))).id)
    await service.reserve(TENANT, req("u4", (b, 1)))  # pending
    return a, b, held.id


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


async def test_reconcile_finds_no_drift_while_the_worker_lags(
    servers: Servers, redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    # given a consistent state whose events no worker persisted yet: write-behind lag is not drift
    await some_trade(service, keys)

    code, out = await cli(env_for(servers), "reconcile")

    assert code == 0, out
    assert "no drift" in out, out


async def test_reconcile_reports_tampered_counters_and_repair_restores_them(
    servers: Servers, redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    a, b, held = await some_trade(service, keys)
    env = env_for(servers)
    truth_a, truth_b = await service.get_sku(TENANT, a), await service.get_sku(TENANT, b)
    held_before = await service.get_reservation(TENANT, held)
    shard_a, shard_b = keys.shard_of(TENANT, a), keys.shard_of(TENANT, b)

    # when Redis's counters are changed behind the service's back
    await redis.hset(keys.sku(shard_a, TENANT, a), "sold", truth_a.sold + 5)  # type: ignore[misc]
    await redis.hset(keys.sku(shard_b, TENANT, b), "on_hand", 99)  # type: ignore[misc]
    code, out = await cli(env, "reconcile")

    # then reconcile exits 1 and tables each drifting SKU and field, Redis's value beside PostgreSQL's
    assert code == 1, out
    assert "drift on 2 SKU(s)" in out, out
    table = rows(out)
    assert ["shard", "tenant", "sku", "field", "redis", "postgresql"] in table, out
    assert [str(shard_a), TENANT, a, "sold", str(truth_a.sold + 5), str(truth_a.sold)] in table, out
    assert [str(shard_b), TENANT, b, "on_hand", "99", str(truth_b.on_hand)] in table, out
    assert len([r for r in table if r[:1] in ([str(shard_a)], [str(shard_b)])]) == 2, "only the tampered fields"

    # when it repairs
    code, out = await cli(env, "reconcile", "--repair")

    # then the shards were rebuilt from PostgreSQL: the counters are true again, the live hold kept
    assert code == 0, out
    assert "drift left: 0" in out, out
    assert await service.get_sku(TENANT, a) == truth_a
    assert await service.get_sku(TENANT, b) == truth_b
    assert await service.get_reservation(TENANT, held) == held_before
    code, out = await cli(env, "reconcile")
    assert code == 0, out
    assert "no drift" in out, out


async def test_status_prints_a_row_per_shard(
    servers: Servers, redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    a, _, _ = await some_trade(service, keys)
    not_ready = keys.shard_of(TENANT, a)
    await redis.delete(keys.ready(not_ready))

    code, out = await cli(env_for(servers), "status")

    assert code == 0, out
    table = rows(out)
    assert table[0][:3] == ["shard", "ready", "stream"], out
    shard_rows = [r for r in table[1:] if r and r[0].isdigit()]
    assert [int(r[0]) for r in shard_rows] == list(keys.all_shards()), out
    for r in shard_rows:
        shard = int(r[0])
        assert r[1] == ("NO" if shard == not_ready else "yes"), r
        assert int(r[2]) == await redis.xlen(keys.events(shard)), r  # the stream's length
    assert out.rstrip().splitlines()[-1].endswith(f"shards not ready: [{not_ready}]"), out


async def test_reconcile_under_live_traffic_reports_the_tampered_sku_and_nothing_else(
    redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    from app.recovery.reconcile import compare

    # given a SKU under constant traffic, a quiet SKU on the same shard (so its stream keeps moving) and a
    # tampered SKU on another shard
    busy = "busy-0"
    quiet = next(s for i in range(1, 10_000) if keys.shard_of(TENANT, s := f"quiet-{i}") == keys.shard_of(TENANT, busy))
    tampered = next(
        s for s in (f"t-{i}" for i in range(10_000)) if keys.shard_of(TENANT, s) != keys.shard_of(TENANT, busy)
    )
    for sku in (busy, quiet, tampered):
        await service.put_sku(TENANT, sku, SkuSettings(on_hand=1_000_000))
    await service.reserve(TENANT, req("q", (quiet, 3)))
    truth = await service.get_sku(TENANT, tampered)
    await redis.hset(keys.sku(keys.shard_of(TENANT, tampered), TENANT, tampered), "held", 7)  # type: ignore[misc]
    stop = asyncio.Event()
    made = 0

    async def traffic() -> None:
        nonlocal made
        while not stop.is_set():
            held = await service.reserve(TENANT, req(f"b{made}", (busy, 1)))
            if made % 2:
                await service.release(TENANT, held.id)
            made += 1

    # when reconcile compares while holds are made and released on the busy SKU
    runner = asyncio.create_task(traffic())
    try:
        # bounded: draining a stream to its end while it grows might never finish
        drift = await asyncio.wait_for(compare(redis, pg, keys), timeout=60)
    finally:
        stop.set()
        await runner

    # then the tampered counter is the only drift: traffic is not drift, and the quiet SKU on the busy
    # shard was compared (it differs from nothing)
    assert made >= 10, "the traffic must run during the comparison for this test to mean anything"
    assert [(d.sku, d.field, d.redis, d.postgres) for d in drift] == [(tampered, "held", "7", str(truth.held))]
