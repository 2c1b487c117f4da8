"""GET /metrics: the write-behind pipeline per shard, in Prometheus text format (app/api/routes/metrics.py,
app/worker/status.py); and /readyz when a shard lost its ready marker and nothing rebuilds it.

The exposition is parsed with prometheus-client's own parser, so a malformed document fails here the way
it would fail a Prometheus scrape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from app.config import Settings
from app.main import create_app
from app.stock.keys import KeySpace
from app.stock.schemas import ReservationItem, ReservationRequest, SkuSettings
from app.stock.service import StockService
from app.worker.consumer import GROUP, WriteBehindWorker
from app.worker.status import pipeline_status
from tests.conftest import SHARDS, Servers
from tests.helpers import mark_ready, put_sku, reserve

TENANT = "default"
GAUGES = (
    "stockhold_stream_length",
    "stockhold_stream_pending",
    "stockhold_stream_undelivered",
    "stockhold_oldest_unpersisted_event_age_seconds",
    "stockhold_shard_ready",
)
ALL_SHARDS = {str(s) for s in range(SHARDS)}


def parse(text: str) -> dict[str, dict[str, float]]:
    """metric name -> shard label -> value for the per-shard series; a sample named twice for one shard fails.

    Other series on the page (the webhook sender's counters, request metrics) carry no shard label.
    """
    gauges: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "shard" not in sample.labels:
                continue
            per_shard = gauges.setdefault(sample.name, {})
            assert sample.labels["shard"] not in per_shard, f"{sample.name} twice for shard {sample.labels}"
            per_shard[sample.labels["shard"]] = sample.value
    return gauges


async def scrape(client: httpx.AsyncClient) -> dict[str, dict[str, float]]:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


async def entries_added(redis: Redis, keys: KeySpace) -> dict[int, int]:
    added = {}
    for shard in keys.all_shards():
        if await redis.exists(keys.events(shard)):
            added[shard] = int((await redis.xinfo_stream(keys.events(shard)))["entries-added"])
    return added


def request(user: str, sku: str, quantity: int = 1) -> ReservationRequest:
    return ReservationRequest(user_id=user, items=[ReservationItem(sku=sku, quantity=quantity)])


@pytest_asyncio.fixture
async def bare_client(servers: Servers, redis: Redis, pg: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    """The app with no write-behind worker in it and no automatic rebuild: nothing persists the streams,
    and a shard that loses its marker stays not ready until an operator rebuilds it."""
    settings = Settings(
        REDIS_URL=servers.redis_url,
        DATABASE_URL=servers.database_url,
        STOCKHOLD_SHARDS=SHARDS,
        STOCKHOLD_AUTO_REBUILD=False,
        STOCKHOLD_WORKER_IN_PROCESS=False,
        STOCKHOLD_REQUIRE_AUTH=False,
    )
    assert (settings.auto_rebuild, settings.worker_in_process) == (False, False)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as http:
            yield http


async def test_metrics_are_prometheus_text_with_every_gauge_for_every_shard(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")

    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain") and "version=" in content_type, content_type
    gauges = parse(response.text)
    for name in GAUGES:
        assert set(gauges.get(name, {})) == ALL_SHARDS, f"{name}: {sorted(gauges.get(name, {}))}"
    assert set(gauges["stockhold_shard_ready"].values()) == {1.0}
    for name in GAUGES[:4]:
        assert all(v >= 0 for v in gauges[name].values()), (name, gauges[name])


async def test_the_in_process_worker_drains_what_the_metrics_count(
    pg: asyncpg.Pool, client: httpx.AsyncClient, redis: Redis, keys: KeySpace
) -> None:
    # given traffic on a few shards (no confirms: every ledger row is then the worker's own)
    for sku in ("m-tea", "m-rice", "m-salt"):
        await put_sku(client, sku, on_hand=50)
        for user in ("ann", "ben", "cy"):
            assert (await reserve(client, user, (sku, 2))).status_code == 201

    # then within a few seconds the worker persisted everything, acknowledged it and trimmed the streams
    deadline = time.monotonic() + 10
    while True:
        gauges = await scrape(client)
        waiting = {
            s
            for s in ALL_SHARDS
            if gauges["stockhold_stream_pending"][s]
            or gauges["stockhold_stream_undelivered"][s]
            or gauges["stockhold_stream_length"][s]
        }
        if not waiting:
            break
        assert time.monotonic() < deadline, f"still waiting after 10 s on shards {sorted(waiting)}: {gauges}"
        await asyncio.sleep(0.2)
    assert set(gauges["stockhold_oldest_unpersisted_event_age_seconds"].values()) == {0.0}
    added = await entries_added(redis, keys)
    persisted = gauges["stockhold_events_persisted"]
    assert {int(s): int(v) for s, v in persisted.items() if v} == {s: n for s, n in added.items() if n}
    assert sum(added.values()) == 12 == await pg.fetchval("SELECT count(*) FROM stock_movement")


async def test_pipeline_status_follows_a_backlog_from_emitted_to_persisted(
    service: StockService, redis: Redis, keys: KeySpace, pg: asyncpg.Pool
) -> None:
    # given four events on one shard and a consumer group, but no worker reading yet
    sku = "backlog-sku"
    shard = keys.shard_of(TENANT, sku)
    await service.put_sku(TENANT, sku, SkuSettings(on_hand=10))
    for user in ("a", "b", "c"):
        await service.reserve(TENANT, request(user, sku))
    worker = WriteBehindWorker(redis, pg, keys, consumer="metrics-worker", batch=100, block_ms=10, claim_idle_ms=0)
    await worker.ensure_groups()
    await asyncio.sleep(0.3)

    status = await pipeline_status(redis, pg, keys)

    # then the shard counts four undelivered events, the oldest at least 0.3 s old; others are empty
    assert [s.shard for s in status] == list(keys.all_shards())
    mine = status[shard]
    assert (mine.backlog.length, mine.backlog.pending, mine.backlog.undelivered) == (4, 0, 4)
    assert 0.3 <= mine.oldest_unpersisted_age_s < 30
    assert mine.persisted_total == 0
    for other in status:
        if other.shard != shard:
            assert (other.backlog.length, other.backlog.unpersisted, other.oldest_unpersisted_age_s) == (0, 0, 0.0)
        assert other.ready

    # when a worker reads two of them and stalls before persisting (PostgreSQL away, say)
    streams = {keys.events(shard): ">"}
    await redis.xreadgroup(GROUP, "stalled-worker", streams, count=2)
    await asyncio.sleep(0.1)
    stalled = (await pipeline_status(redis, pg, keys))[shard]

    # then two are pending, two undelivered, and the oldest is still the first event, only older
    assert (stalled.backlog.pending, stalled.backlog.undelivered) == (2, 2)
    assert stalled.oldest_unpersisted_age_s >= mine.oldest_unpersisted_age_s + 0.1

    # when a live worker persists what nobody read: the stalled entries still count, and so does their age
    assert await worker.step() == 2
    half = (await pipeline_status(redis, pg, keys))[shard]
    assert (half.backlog.pending, half.backlog.undelivered) == (2, 0)
    assert half.oldest_unpersisted_age_s >= stalled.oldest_unpersisted_age_s
    assert half.persisted_total == 2

    # when it takes over the stalled worker's entries (claim_idle_ms=0 here, 30 s in service)
    assert await worker.reclaim() == 2
    done = (await pipeline_status(redis, pg, keys))[shard]

    # then nothing waits, the age is 0, and all four are counted as persisted
    assert (done.backlog.pending, done.backlog.undelivered, done.oldest_unpersisted_age_s) == (0, 0, 0.0)
    assert done.persisted_total == 4 == await pg.fetchval("SELECT count(*) FROM stock_movement")
    assert await worker.trim() == 4
    assert (await pipeline_status(redis, pg, keys))[shard].backlog.length == 0

    # and a shard whose marker is gone reports not ready (nothing else changes)
    await redis.delete(keys.ready(shard))
    assert [s.shard for s in await pipeline_status(redis, pg, keys) if not s.ready] == [shard]


async def test_events_no_worker_ever_read_count_as_waiting_with_their_age(
    bare_client: httpx.AsyncClient, keys: KeySpace
) -> None:
    # No worker has run (STOCKHOLD_WORKER_IN_PROCESS=false, `stockhold worker` not started yet, or Redis
    # lost its data and with it the consumer group): the stream has no group at all. Its events are
    # still unpersisted, and the age of the oldest is exactly what an alert on a stuck pipeline watches.
    await put_sku(bare_client, "nobody-reads", on_hand=5)
    assert (await reserve(bare_client, "dora", ("nobody-reads", 1))).status_code == 201
    shard = str(keys.shard_of(TENANT, "nobody-reads"))
    await asyncio.sleep(0.3)

    gauges = await scrape(bare_client)

    assert gauges["stockhold_stream_length"][shard] == 2
    assert gauges["stockhold_stream_undelivered"][shard] == 2
    assert gauges["stockhold_stream_pending"][shard] == 0
    assert gauges["stockhold_oldest_unpersisted_event_age_seconds"][shard] >= 0.3, (
        "two events wait for PostgreSQL, yet the oldest unpersisted event is reported 0 s old"
    )


async def test_a_shard_without_its_marker_is_not_ready_until_rebuilt(
    bare_client: httpx.AsyncClient, redis: Redis, keys: KeySpace
) -> None:
    assert (await bare_client.get("/readyz")).status_code == 200
    lost = 11

    # when shard 11 loses its ready marker (Redis lost its data) and automatic rebuild is off
    await redis.delete(keys.ready(lost))
    await asyncio.sleep(0.7)  # longer than the readiness watch's 0.5 s tick: it must not rebuild

    # then /readyz fails on exactly that check, naming the shard, and the gauge says 0 for it alone
    ready = await bare_client.get("/readyz")
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["code"] == "not_ready"
    checks = body["checks"]
    assert checks["rebuilt"].startswith("failed") and f"[{lost}]" in checks["rebuilt"], checks
    assert {k: v for k, v in checks.items() if k != "rebuilt"} == {"redis": "ok", "postgres": "ok", "sweeper": "ok"}
    ready_gauge = (await scrape(bare_client))["stockhold_shard_ready"]
    assert {s: v for s, v in ready_gauge.items() if v != 1.0} == {str(lost): 0.0}
    assert not await redis.exists(keys.ready(lost)), "nothing may rebuild the shard with auto rebuild off"

    # when it is marked again (what `stockhold rebuild` ends with), it is ready again
    await mark_ready(redis, keys)
    assert (await bare_client.get("/readyz")).status_code == 200
    assert set((await scrape(bare_client))["stockhold_shard_ready"].values()) == {1.0}
