"""Fixtures for the webhook tests: PostgreSQL without webhook state, the real app with fast retries, and
helpers to put stock events on a shard stream (as the Lua scripts emit them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest_asyncio
from fastapi import FastAPI
from redis.asyncio import Redis

from app.config import Settings
from app.main import create_app
from app.stock.keys import KeySpace

WEBHOOK_TABLES = ("webhook_attempt", "webhook_delivery", "webhook_event", "webhook_endpoint", "sku_alert")
# Retries in tens of milliseconds, so a test sees a whole retry schedule in well under a second.
FAST = {
    "webhook_retry_base_s": 0.05,
    "webhook_retry_cap_s": 0.2,
    "webhook_poll_ms": 50,
    "webhook_timeout_s": 1.0,
    "webhook_max_attempts": 4,
    "webhook_claim_idle_ms": 500,
}


@pytest_asyncio.fixture
async def wh_pg(pg: asyncpg.Pool) -> asyncpg.Pool:
    """PostgreSQL with no stock state and no webhook state."""
    await pg.execute(f"TRUNCATE {', '.join(WEBHOOK_TABLES)}")
    return pg


@pytest_asyncio.fixture
async def wh_app(settings: Settings, redis: Redis, wh_pg: asyncpg.Pool) -> AsyncIterator[FastAPI]:
    application = create_app(settings.model_copy(update=FAST))
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture
async def wh_client(wh_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=wh_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as http:
        yield http


async def add_event(redis: Redis, keys: KeySpace, shard: int, **fields: Any) -> str:
    """XADDs a stock event to a shard stream, with the fields emit() gives (a test stands in for a script)."""
    base = {"type": "held", "tenant": "default", "sku": "tea", "qty": 1, "res": "", "user": "u1"}
    base |= {"on_hand": 10, "held": 1, "sold": 0, "at": 1_700_000_000_000}
    return str(await redis.xadd(keys.events(shard), {k: str(v) for k, v in (base | fields).items()}))
