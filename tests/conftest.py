"""Real servers for the whole suite: TEST_REDIS_URL / TEST_DATABASE_URL when set, otherwise embedded
valkey-server and PostgreSQL started once per session under pytest's temporary directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from redis.asyncio import Redis

from app.config import Settings
from app.main import create_app
from app.stock.idempotency import IdempotencyStore
from app.stock.keys import KeySpace
from app.stock.service import StockService
from app.stock.sweeper import ExpirySweeper
from app.store.embedded import EmbeddedPostgres, EmbeddedRedis
from app.store.postgres import apply_migrations, create_pool
from app.store.redis import connect_redis
from app.store.scripts import Scripts
from app.worker.ledger import PostgresLedger
from tests.helpers import mark_ready

TENANT = "default"
SHARDS = 16
STATE_TABLES = (
    "stock_movement",
    "sku",
    "reservation",
    "reservation_line",
    "worker_progress",
    "listing",
    "sku_channel",
    "sku_split",
    "bucket_move",
)


@dataclass(frozen=True)
class Servers:
    redis_url: str
    database_url: str
    embedded_redis: EmbeddedRedis | None


def embedded_data_dir(stack: ExitStack) -> Path:
    """A private directory for embedded servers, removed at the end. Not under pytest's tmp_path: pytest
    resets /tmp/pytest-of-<user> to mode 0700 whenever another session starts, which would lock the
    embedded PostgreSQL (run as its own system user under root) out of its data directory."""
    base = Path(tempfile.mkdtemp(prefix="stockhold-test-"))
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    return base


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    with ExitStack() as stack:
        base = embedded_data_dir(stack)
        redis_url = os.environ.get("TEST_REDIS_URL")
        embedded_redis = None
        if not redis_url:
            embedded_redis = EmbeddedRedis(base / "redis")
            redis_url = embedded_redis.start()
            stack.callback(embedded_redis.stop)
        database_url = os.environ.get("TEST_DATABASE_URL")
        if not database_url:
            pg = EmbeddedPostgres(base / "postgres")
            database_url = pg.start()
            stack.callback(pg.stop)
        yield Servers(redis_url, database_url, embedded_redis)


@pytest.fixture(scope="session")
def settings(servers: Servers) -> Settings:
    return Settings(
        REDIS_URL=servers.redis_url,
        DATABASE_URL=servers.database_url,
        STOCKHOLD_SHARDS=SHARDS,
        STOCKHOLD_SWEEP_INTERVAL_MS=100,
        # The suite predates API keys and acts as the default tenant; tests/api/test_auth.py requires keys.
        STOCKHOLD_REQUIRE_AUTH=False,
    )


@pytest_asyncio.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A flushed Redis whose shards are marked rebuilt (a fresh install)."""
    assert settings.redis_url
    client = connect_redis(settings.redis_url, pool_size=256)
    await client.flushdb()
    await mark_ready(client, KeySpace(SHARDS))
    yield client
    await client.aclose()


@pytest_asyncio.fixture(scope="session")
async def pg_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """One migrated pool for the session. Tests reading PostgreSQL's state take `pg` (emptied first)."""
    assert settings.database_url
    pool = await create_pool(settings.database_url, max_size=8)
    await apply_migrations(pool)
    yield pool
    await pool.close()


@pytest_asyncio.fixture
async def pg(pg_pool: asyncpg.Pool) -> asyncpg.Pool:
    """PostgreSQL with no stock state: the ledger and every projection emptied."""
    await pg_pool.execute(f"TRUNCATE {', '.join(STATE_TABLES)}")
    return pg_pool


@pytest_asyncio.fixture
async def scripts(redis: Redis) -> Scripts:
    loaded = Scripts(redis)
    await loaded.load()
    return loaded


@pytest.fixture
def keys() -> KeySpace:
    return KeySpace(SHARDS)


@pytest.fixture
def service(redis: Redis, scripts: Scripts, keys: KeySpace, pg_pool: asyncpg.Pool) -> StockService:
    return StockService(redis, scripts, keys, PostgresLedger(pg_pool), idempotency_ttl_seconds=3600)


@pytest.fixture
def idempotency(redis: Redis, scripts: Scripts, keys: KeySpace) -> IdempotencyStore:
    return IdempotencyStore(redis, scripts, keys, ttl_seconds=3600)


@pytest.fixture
def sweeper(redis: Redis, scripts: Scripts, keys: KeySpace) -> ExpirySweeper:
    return ExpirySweeper(redis, scripts, keys, interval_ms=100, batch=50)


@pytest_asyncio.fixture
async def app(settings: Settings, redis: Redis) -> AsyncIterator[FastAPI]:
    """The real app with its lifespan (migrations, scripts, sweeper) on a flushed Redis."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as http:
        yield http
