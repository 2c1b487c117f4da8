"""A real Redis Cluster for these tests: six servers on loopback ports (three primaries, a replica each),
created with `redis-cli --cluster create` (app/store/local_cluster.py). The suite's other fixtures (`redis`,
`app`, `client`...) run on it unchanged, because `settings` here points REDIS_URL at the cluster."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from app.config import Settings
from app.store.local_cluster import LocalCluster
from tests.conftest import SHARDS, Servers, embedded_data_dir


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    with ExitStack() as stack:
        cluster = LocalCluster(embedded_data_dir(stack) / "cluster")
        stack.callback(cluster.stop)
        cluster.start()
        yield cluster


@pytest.fixture(scope="session")
def settings(servers: Servers, local_cluster: LocalCluster) -> Settings:
    return Settings(
        REDIS_URL=local_cluster.url,
        DATABASE_URL=servers.database_url,
        STOCKHOLD_SHARDS=SHARDS,
        STOCKHOLD_SWEEP_INTERVAL_MS=100,
        STOCKHOLD_REQUIRE_AUTH=False,
    )
