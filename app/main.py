"""Builds the FastAPI app. The lifespan opens Redis and PostgreSQL, applies migrations, loads the Lua
scripts, rebuilds any shard that lost its data (recovery before serving), and starts the expiry sweeper,
the readiness watch, the API key epoch refresh, the split map's refresh, the sold-out fast path's refresh (and, unless
STOCKHOLD_WORKER_IN_PROCESS=false, the write-behind worker; unless STOCKHOLD_WEBHOOKS=false, the webhook
dispatcher and sender); routes stay thin and translate domain errors to
problem+json. The per-IP rate limit stands in front of everything under /v1 (app/api/client_limits.py), the
reserve hot path included."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from app.api.auth import open_mode_notice, open_principal
from app.api.body_guard import BodyGuard
from app.api.client_limits import admit_client
from app.api.hot_path import is_hot, serve_reserve
from app.api.observe import observe
from app.api.problems import install_problem_handlers
from app.api.routes import dashboard, listings, metrics, ops, reservations, skus, webhooks
from app.auth.authenticator import Authenticator
from app.auth.store import KeyStore
from app.config import Settings, get_settings
from app.recovery.rebuild import Rebuilder
from app.recovery.watch import ReadinessWatch
from app.runtime import freeze_startup_heap
from app.stock.buckets import SplitMap
from app.stock.dashboard import DashboardReader
from app.stock.idempotency import IdempotencyStore
from app.stock.keys import KeySpace
from app.stock.listings import ListingCatalogue
from app.stock.rate_limits import RateLimiter, bucket
from app.stock.service import StockService
from app.stock.sold_out import SoldOutBook
from app.stock.splitting import Splitter
from app.stock.sweeper import ExpirySweeper
from app.store.postgres import apply_migrations, create_pool
from app.store.redis import connect_redis
from app.store.scripts import Scripts
from app.telemetry.metrics import Metrics
from app.webhooks.process import start_webhooks
from app.worker.consumer import WriteBehindWorker
from app.worker.ledger import PostgresLedger

log = logging.getLogger("stockhold")
# A worker sharing the event loop with requests persists smaller batches than `stockhold worker` (500):
# encoding a batch holds the loop for a while, and 500-event steps showed as the p99 of reservations (wrk,
# 2 workers: p99 25 ms at 500, 17.5 ms at 100, throughput 6,850 -> 7,200/s). When it falls behind it
# reads up to 4x as many per step (WriteBehindWorker.max_batch) until it has caught up.
IN_PROCESS_WORKER_BATCH = 100
BACKGROUND_POOL_SIZE = 4  # the sold-out refresh holds one in XREAD BLOCK; the key epoch and split map one more


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if not settings.redis_url or not settings.database_url:
        raise RuntimeError("REDIS_URL and DATABASE_URL must be set (`stockhold serve` starts embedded servers)")
    redis = connect_redis(settings.redis_url)
    # The refresh loops (sold-out fast path, API key epoch) get their own few connections: waiting behind a
    # burst of requests for the main pool would leave their knowledge stale for as long as the burst lasts.
    background = connect_redis(settings.redis_url, pool_size=BACKGROUND_POOL_SIZE)
    pg = await create_pool(settings.database_url)
    try:
        await apply_migrations(pg)
        scripts = Scripts(
            redis, wait_replicas=settings.redis_wait_replicas, wait_timeout_ms=settings.redis_wait_timeout_ms
        )
        await scripts.load()
        keys = KeySpace(settings.shard_count)
        telemetry: Metrics = app.state.metrics
        sweeper = ExpirySweeper(
            redis, scripts, keys, settings.sweep_interval_ms, settings.sweep_batch, metrics=telemetry
        )
        watch = ReadinessWatch(Rebuilder(redis, pg, keys), auto_rebuild=settings.auto_rebuild)
        scripts.on_lost_writes(watch.withdraw_slots)  # a Redis Cluster failover that may have lost writes
        stop = asyncio.Event()
        app.state.redis, app.state.pg, app.state.scripts, app.state.keys = redis, pg, scripts, keys
        refresh_ms = settings.sold_out_refresh_ms
        hit = telemetry.sold_out_hits.inc
        sold_out = SoldOutBook(background, keys, refresh_ms, on_hit=hit) if refresh_ms else None
        splits = SplitMap(background, pg, keys)
        await splits.load()  # before serving: a split SKU's reservations are routed over its buckets from the start
        app.state.service = StockService(
            redis,
            scripts,
            keys,
            PostgresLedger(pg),
            idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
            sold_out=sold_out,
            listings=ListingCatalogue(redis, pg, keys),
            splits=splits,
        )
        app.state.service.splitter = Splitter(app.state.service, pg, splits, settings.idempotency_ttl_seconds)
        app.state.listings = app.state.service.listings
        app.state.dashboard = DashboardReader(redis, pg, keys, splits)
        app.state.idempotency = IdempotencyStore(redis, scripts, keys, settings.idempotency_ttl_seconds)
        app.state.rate_limiter = RateLimiter(
            scripts,
            keys,
            per_user=bucket(settings.user_rate_per_second, settings.user_burst),
            per_ip=bucket(settings.ip_rate_per_second, settings.ip_burst),
        )
        app.state.sweeper, app.state.watch = sweeper, watch
        authenticator = Authenticator(KeyStore(pg), background, keys, settings.auth_refresh_ms)
        app.state.authenticator = authenticator
        if not settings.auth_required:
            log.warning("API keys NOT required: %s", open_mode_notice(settings))
        await watch.check_once()  # recovery before serving: rebuild what Redis lost (when automatic)
        freeze_startup_heap()  # after everything start-up allocates: see app/runtime.py
        tasks = [
            asyncio.create_task(sweeper.run(stop), name="expiry-sweeper"),
            asyncio.create_task(watch.run(stop), name="readiness-watch"),
            asyncio.create_task(authenticator.run(stop), name="api-key-epoch"),
            asyncio.create_task(splits.run(stop), name="split-map"),
        ]
        app.state.sweeper_task = tasks[0]
        if sold_out is not None:
            tasks.append(asyncio.create_task(sold_out.run(stop), name="sold-out-refresh"))
        if settings.worker_in_process:
            consumer = f"api-{socket.gethostname()}-{os.getpid()}"
            worker = WriteBehindWorker(
                redis,
                pg,
                keys,
                consumer=consumer,
                batch=IN_PROCESS_WORKER_BATCH,
                wait_replicas=settings.redis_wait_replicas,
            )
            await worker.ensure_groups()  # before serving, so the streams and groups exist from the start
            app.state.worker = worker
            tasks.append(asyncio.create_task(worker.run(stop), name="write-behind"))
        tasks += await start_webhooks(app.state, settings, stop)  # the stores and routes; the tasks when on
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        await redis.aclose()
        await background.aclose()
        await pg.close()
        app.state.metrics.close()


class Stockhold(FastAPI):
    """FastAPI with the reserve hot path (app/api/hot_path.py) in front of its middleware stack, and in
    front of both the request id and the request metrics (app/api/observe.py)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await observe(self.state.metrics, scope, receive, send, self._serve)  # request id, latency
        else:
            await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not await admit_client(self.state, scope, receive, send):
            return
        if is_hot(scope):
            await serve_reserve(self.state, scope, receive, send, super().__call__)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = Stockhold(
        title="stockhold",
        version="0.1.0",
        summary="Stock reservations that never oversell: atomic Redis holds, PostgreSQL system of record.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.open_principal = open_principal(settings)
    app.state.sweeper_task = None
    install_problem_handlers(app)
    app.include_router(skus.router)
    app.include_router(listings.router)
    app.include_router(webhooks.router)
    app.include_router(webhooks.alerts_router)
    app.include_router(reservations.router)
    app.include_router(dashboard.router)
    app.include_router(dashboard.page_router)
    app.include_router(ops.router)
    app.include_router(metrics.router)
    app.state.metrics = Metrics()  # before the lifespan: the sweeper, the fast path and the sender count here
    app.state.gauges = metrics.PipelineGauges(app.state.metrics.scrape)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes)
    return app
