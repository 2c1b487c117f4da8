"""Revocation takes effect at once, across processes: a real `stockhold serve --workers 2` with keys
required, a key in use over connections held open to both API processes, `stockhold keys revoke` as an
operator runs it, and then the very next requests on those same connections are 401."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest
from redis.asyncio import Redis

from app.auth.scopes import Scope
from app.auth.store import KeyStore
from app.stock.keys import KeySpace
from tests.auth.test_cli_keys import KEY, keys_cli
from tests.conftest import Servers
from tests.processes import stockhold_serve

CONNECTIONS = 32


@pytest.fixture
def secured_server(servers: Servers, redis: Redis, tmp_path: Path) -> Iterator[str]:
    env = {
        **os.environ,
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        "STOCKHOLD_SHARDS": "16",
        "STOCKHOLD_REQUIRE_AUTH": "true",
    }
    with stockhold_serve(env, tmp_path / "server.log", workers=2) as base:
        yield base


def workers_serving(port: int) -> set[int]:
    """PIDs of the processes holding established server-side connections on ``port``."""
    pids = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port and conn.pid:
            pids.add(conn.pid)
    return pids


async def test_once_keys_revoke_returns_no_worker_accepts_the_key(
    secured_server: str, servers: Servers, redis: Redis, pg_pool: asyncpg.Pool
) -> None:
    await pg_pool.execute("TRUNCATE api_key, tenant")
    _, admin = await KeyStore(pg_pool).create("acme", Scope.ADMIN)
    created = await keys_cli(servers, "create", "--tenant", "acme", "--scope", "checkout")
    assert created.code == 0, created.stderr
    token = created.stdout.strip()
    assert KEY.fullmatch(token), token
    checkout = {"authorization": f"Bearer {token}"}
    key_id = token.split("_")[1]
    body = {"user_id": "u", "items": [{"sku": "tea", "quantity": 1}]}
    base = secured_server
    port = int(base.rsplit(":", 1)[1])

    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with contextlib.AsyncExitStack() as stack:
        clients: list[httpx.AsyncClient] = []

        async def burst() -> list[int]:
            """A reserve (hot path) and a read (FastAPI) on every connection of every client at once."""
            calls = []
            for http in clients:
                calls += [http.post("/v1/reservations", json=body, headers=checkout) for _ in range(CONNECTIONS)]
                calls += [http.get("/v1/skus/tea", headers=checkout) for _ in range(CONNECTIONS)]
            return [r.status_code for r in await asyncio.gather(*calls)]

        # given the key in use on connections to both API processes (each has it cached): the kernel hands
        # each new connection to either process, so open more until both hold some
        while len(workers_serving(port)) < 2:
            assert len(clients) < 5, "every connection went to one worker"
            clients.append(await stack.enter_async_context(httpx.AsyncClient(base_url=base, limits=limits)))
            if len(clients) == 1:
                admin_auth = {"authorization": f"Bearer {admin.token}"}
                put = await clients[0].put("/v1/skus/tea", json={"on_hand": 100_000}, headers=admin_auth)
                assert put.status_code == 201, put.text
            assert set(await burst()) == {200, 201}
        serving = workers_serving(port)
        assert await redis.hlen(KeySpace.auth_acks()) == 2

        # when the operator revokes it
        revoked = await keys_cli(servers, "revoke", key_id)

        # then both processes acknowledged before the command returned...
        assert revoked.code == 0, revoked.stdout + revoked.stderr
        barrier = re.search(r"every API process refuses it: 2 acknowledged in (\d+) ms", revoked.stdout)
        assert barrier, revoked.stdout
        print(f"\nkeys revoke: {barrier[0]}")
        # ...and the very next requests, on the same connections to both processes, are all refused
        statuses = await burst()
        assert workers_serving(port) == serving
        assert set(statuses) == {401}, statuses
        for _ in range(3):
            assert set(await burst()) == {401}
