"""The migration runner: applies in order, records checksums, is a no-op when re-run, serialises
concurrent starters, and refuses an edited landed migration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio

from app.config import Settings
from app.store.postgres import MigrationError, apply_migrations, create_pool, read_migrations


@pytest_asyncio.fixture
async def scratch_db(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A throwaway database on the test server, so these tests see a schema from nothing."""
    assert settings.database_url
    admin = await asyncpg.connect(settings.database_url)
    name = "stockhold_migration_test"
    await admin.execute(f"DROP DATABASE IF EXISTS {name}")
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = urlsplit(settings.database_url)._replace(path=f"/{name}").geturl()
    pool = await create_pool(dsn, max_size=6)
    try:
        yield pool
    finally:
        await pool.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.close()


async def test_applies_once_and_records(scratch_db: asyncpg.Pool) -> None:
    versions = [m.version for m in read_migrations()]
    assert await apply_migrations(scratch_db) == versions
    assert await apply_migrations(scratch_db) == []
    recorded = await scratch_db.fetch("SELECT version FROM schema_migration ORDER BY version")
    assert [r["version"] for r in recorded] == versions
    assert await scratch_db.fetchval("SELECT count(*) FROM stock_movement") == 0


async def test_concurrent_starters_apply_each_migration_once(scratch_db: asyncpg.Pool) -> None:
    results = await asyncio.gather(*(apply_migrations(scratch_db) for _ in range(5)))
    applied = [v for result in results for v in result]
    assert sorted(applied) == [m.version for m in read_migrations()]


async def test_edited_migration_is_refused(scratch_db: asyncpg.Pool, tmp_path: Path) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE t1 (id int);")
    assert await apply_migrations(scratch_db, tmp_path) == ["0001"]
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE t1 (id bigint);")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await apply_migrations(scratch_db, tmp_path)
