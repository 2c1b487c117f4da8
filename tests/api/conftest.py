"""Fixtures for API tests that need a real `stockhold serve` process (started and stopped by PID)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.processes import stockhold_serve


@pytest.fixture
def server(servers: Servers, redis: object, tmp_path: Path) -> Iterator[str]:  # `redis` flushes the db first
    env = {
        **os.environ,
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        "STOCKHOLD_SHARDS": "16",
        "STOCKHOLD_REQUIRE_AUTH": "false",  # the README walk-through and these tests send no key
    }
    with stockhold_serve(env, tmp_path / "server.log") as base:
        yield base
