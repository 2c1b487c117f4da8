"""The dispatcher against real Redis streams and PostgreSQL: its own group from the streams' end, prompt
acknowledgement, one outbox row per event and endpoint however often an entry is processed, and a
crashed dispatcher's entries taken over."""

from __future__ import annotations

import asyncio
import os
import sys
from asyncio.subprocess import PIPE

import asyncpg
from redis.asyncio import Redis

from app.stock.events import parse_entries
from app.stock.keys import KeySpace
from app.webhooks.dispatcher import GROUP, WebhookDispatcher
from app.webhooks.rules import WebhookEventType
from app.webhooks.schemas import WebhookCreate
from app.webhooks.store import WebhookStore
from app.worker.backlog import PERSISTING_GROUP, read_backlog, trim_persisted
from tests.conftest import Servers
from tests.processes import REPO
from tests.webhooks.conftest import add_event

SOLD_OUT = {"av0": 1, "av": 0, "bo": 0}


async def subscribe(pg: asyncpg.Pool, tenant: str = "default", *events: WebhookEventType) -> str:
    body = WebhookCreate(url="http://127.0.0.1:9/hook", events=list(events or WebhookEventType))
    return (await WebhookStore(pg).create(tenant, body)).id


async def deliveries(pg: asyncpg.Pool) -> list[tuple[str, str]]:
    rows = await pg.fetch("SELECT endpoint_id, event_id FROM webhook_delivery ORDER BY endpoint_id, event_id")
    return [(r["endpoint_id"], r["event_id"]) for r in rows]


async def drain(d: WebhookDispatcher) -> None:
    while await d.step() > 0:
        pass


async def test_the_group_starts_at_the_streams_end_so_history_is_not_replayed(
    redis: Redis, wh_pg: asyncpg.Pool, keys: KeySpace
) -> None:
    # given a stream with history from before webhooks ran, and an endpoint
    await add_event(redis, keys, 2, **SOLD_OUT)
    endpoint = await subscribe(wh_pg)
    d = WebhookDispatcher(redis, wh_pg, keys, "c1", block_ms=10)
    await d.ensure_groups()

    # when the dispatcher runs and one new event arrives
    await drain(d)
    assert await deliveries(wh_pg) == []
    new = await add_event(redis, keys, 2, **SOLD_OUT)
    await drain(d)

    # then only the new one is delivered
    assert await deliveries(wh_pg) == [(endpoint, f"evt_2_{new}_sold_out")]
    await d.ensure_groups()  # idempotent: the group keeps its position
    assert await d.step() == 0


async def test_without_webhooks_entries_are_acknowledged_at_once_and_trimming_goes_on(
    redis: Redis, wh_pg: asyncpg.Pool, keys: KeySpace
) -> None:
    d = WebhookDispatcher(redis, wh_pg, keys, "c1", block_ms=10)
    await d.ensure_groups()
    for i in range(50):
        await add_event(redis, keys, i % 3, **SOLD_OUT)
    for shard in range(3):  # and a write-behind group that has persisted them all
        await redis.xgroup_create(keys.events(shard), PERSISTING_GROUP, id="$")
    assert await trim_persisted(redis, keys) == 0  # the webhook group has not read them yet

    await drain(d)

    for shard in range(3):
        assert (await redis.xpending(keys.events(shard), GROUP))["pending"] == 0
    assert await trim_persisted(redis, keys) == 50
    assert await wh_pg.fetchval("SELECT count(*) FROM webhook_event") == 0  # nothing subscribed: nothing kept


async def test_an_entry_processed_twice_records_one_delivery_per_endpoint(
    redis: Redis, wh_pg: asyncpg.Pool, keys: KeySpace
) -> None:
    a, b = await subscribe(wh_pg), await subscribe(wh_pg, "default", WebhookEventType.SOLD_OUT)
    await subscribe(wh_pg, "default", WebhookEventType.BACK_IN_STOCK)  # not this event's type
    await subscribe(wh_pg, "other-tenant")  # not this event's tenant
    inactive = await subscribe(wh_pg)
    await wh_pg.execute("UPDATE webhook_endpoint SET active = false WHERE id = $1", inactive)
    d = WebhookDispatcher(redis, wh_pg, keys, "c1", block_ms=10)
    await d.ensure_groups()
    entry = await add_event(redis, keys, 5, **SOLD_OUT)
    await drain(d)

    # when the same entry is processed again (a redelivery after a crash between commit and XACK)
    again = parse_entries(5, await redis.xrange(keys.events(5)))
    await d._record_and_ack(again, [])
    await d._record_and_ack(again, [])

    event_id = f"evt_5_{entry}_sold_out"
    assert await deliveries(wh_pg) == sorted([(a, event_id), (b, event_id)])
    assert d.deliveries_recorded == 2


async def test_a_reservation_expiring_on_several_shards_is_one_event(
    redis: Redis, wh_pg: asyncpg.Pool, keys: KeySpace
) -> None:
    endpoint = await subscribe(wh_pg, "default", WebhookEventType.RESERVATION_EXPIRED)
    d = WebhookDispatcher(redis, wh_pg, keys, "c1", block_ms=10)
    await d.ensure_groups()
    res = "rsv_1_aaaaaaaaaaaaaaaa"
    await add_event(redis, keys, 1, type="expired", res=res, st="expired", sku="tea")
    await add_event(redis, keys, 1, type="lapsed", res=res, st="expired", sku="pot")
    await add_event(redis, keys, 7, type="expired", res=res, st="expired", sku="cup")
    await drain(d)

    assert await deliveries(wh_pg) == [(endpoint, f"evt_{res}_reservation_expired")]


async def test_a_crashed_dispatchers_entries_stay_pending_and_are_taken_over(
    redis: Redis, wh_pg: asyncpg.Pool, keys: KeySpace
) -> None:
    endpoint = await subscribe(wh_pg)
    dead = WebhookDispatcher(redis, wh_pg, keys, "dead", block_ms=10)
    await dead.ensure_groups()
    entries = [await add_event(redis, keys, 4, **SOLD_OUT) for _ in range(3)]
    # given a dispatcher that read the entries and died before recording them (no XACK)
    await redis.xreadgroup(GROUP, "dead", {keys.events(4): ">"}, count=10)
    assert (await redis.xpending(keys.events(4), GROUP))["pending"] == 3

    # when a live dispatcher looks for entries idle longer than claim_idle_ms
    live = WebhookDispatcher(redis, wh_pg, keys, "live", block_ms=10, claim_idle_ms=100)
    assert await live.step() == 0  # new entries only: the dead one's are not handed out again
    await asyncio.sleep(0.15)
    assert await live.reclaim() == 3

    # then every entry is recorded once and nothing is pending
    assert await deliveries(wh_pg) == sorted((endpoint, f"evt_4_{e}_sold_out") for e in entries)
    assert (await redis.xpending(keys.events(4), GROUP))["pending"] == 0


async def test_low_stock_reads_the_skus_threshold_from_postgresql(
    redis: Redis, wh_pg: asyncpg.Pool, keys: KeySpace
) -> None:
    endpoint = await subscribe(wh_pg, "default", WebhookEventType.LOW_STOCK)
    await WebhookStore(wh_pg).put_alert("default", "tea", 3)
    d = WebhookDispatcher(redis, wh_pg, keys, "c1", block_ms=10)
    await d.ensure_groups()
    crossing = await add_event(redis, keys, 0, sku="tea", av0=4, av=3, bo=0)
    await add_event(redis, keys, 0, sku="tea", av0=3, av=2, bo=0)  # already low
    await add_event(redis, keys, 0, sku="cup", av0=4, av=3, bo=0)  # no threshold
    await drain(d)

    assert await deliveries(wh_pg) == [(endpoint, f"evt_0_{crossing}_low_stock")]


async def test_a_group_lost_with_redis_is_created_again(redis: Redis, wh_pg: asyncpg.Pool, keys: KeySpace) -> None:
    endpoint = await subscribe(wh_pg)
    d = WebhookDispatcher(redis, wh_pg, keys, "c1", block_ms=10)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        await asyncio.sleep(0.1)
        await redis.flushdb()  # Redis lost its data: streams and groups gone
        await asyncio.sleep(0.1)
        entry = await add_event(redis, keys, 6, **SOLD_OUT)
        for _ in range(100):
            if await deliveries(wh_pg):
                break
            await asyncio.sleep(0.05)
        assert await deliveries(wh_pg) == [(endpoint, f"evt_6_{entry}_sold_out")]
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def test_webhooks_detach_drops_the_group_so_trimming_no_longer_waits_for_it(
    servers: Servers, redis: Redis, wh_pg: asyncpg.Pool, keys: KeySpace
) -> None:
    # given the group left behind by processes that ran webhooks, and entries it never read
    await WebhookDispatcher(redis, wh_pg, keys, "c1").ensure_groups()
    for _ in range(3):
        await add_event(redis, keys, 8, **SOLD_OUT)
    await redis.xgroup_create(keys.events(8), PERSISTING_GROUP, id="$")  # a caught-up writer group beside it
    assert await trim_persisted(redis, keys) == 0  # held back by the webhook group

    # when the operator detaches it
    env = {**os.environ, "REDIS_URL": servers.redis_url, "DATABASE_URL": servers.database_url, "STOCKHOLD_SHARDS": "16"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "webhooks-detach", env=env, cwd=REPO, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)

    # then the group is gone from every stream and the entries can be trimmed
    assert proc.returncode == 0, err.decode()
    assert "destroyed on 16 shard stream(s)" in out.decode()
    assert all(g["name"] != GROUP for g in await redis.xinfo_groups(keys.events(8)))
    assert await trim_persisted(redis, keys) == 3


async def test_the_webhook_group_neither_counts_as_persisting_nor_lets_a_stream_be_trimmed_alone(
    redis: Redis, wh_pg: asyncpg.Pool, keys: KeySpace
) -> None:
    # given events no write-behind worker has read, which the webhook dispatcher has handled
    d = WebhookDispatcher(redis, wh_pg, keys, "c1", block_ms=10)
    await d.ensure_groups()
    for _ in range(4):
        await add_event(redis, keys, 9, **SOLD_OUT)
    await drain(d)

    # then they still wait for PostgreSQL, and trimming keeps them
    shard = (await read_backlog(redis, keys))[9]
    assert (shard.undelivered, shard.pending, shard.floor) == (4, 0, None)
    assert shard.oldest_unpersisted_ms is not None
    assert await trim_persisted(redis, keys) == 0
    assert await redis.xlen(keys.events(9)) == 4
