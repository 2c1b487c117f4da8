"""Fixtures for the API key tests: the suite's real PostgreSQL with no keys and no tenants."""

from __future__ import annotations

import asyncpg
import pytest_asyncio

from app.auth.store import KeyStore


@pytest_asyncio.fixture
async def key_store(pg_pool: asyncpg.Pool) -> KeyStore:
    await pg_pool.execute("TRUNCATE api_key, tenant")
    return KeyStore(pg_pool)
