"""The real thing: `stockhold serve` with two API worker processes over TCP, 2,000 buyers, one bottle.

Two workers means two processes racing on the same Redis, each with its own sweeper, the way several
replicas would. The server is started and stopped by this test (by its own PID), on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(servers: Servers, redis: object, tmp_path: Path) -> Iterator[str]:  # `redis` flushes the db first
    port = _free_port()
    log_path = tmp_path / "server.log"
    env = {
        **os.environ,
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        "STOCKHOLD_SHARDS": "16",
    }
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "2"]
    log = log_path.open("wb")  # a file, not a pipe: an unread pipe fills up and blocks the server
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        else:
            raise AssertionError("server did not become ready in 30 s")
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def test_two_workers_2000_buyers_one_bottle(server: str) -> None:
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=server, limits=limits, timeout=30) as http:
        assert (await http.put("/v1/skus/last-bottle", json={"on_hand": 1})).status_code == 201

        async def buy(i: int) -> tuple[int, str]:
            r = await http.post(
                "/v1/reservations", json={"user_id": f"u{i}", "items": [{"sku": "last-bottle", "quantity": 1}]}
            )
            return r.status_code, r.json().get("code") or r.json()["status"]

        outcomes = Counter(await asyncio.gather(*(buy(i) for i in range(2000))))
        state = (await http.get("/v1/skus/last-bottle")).json()

    assert outcomes == {(201, "held"): 1, (409, "insufficient_stock"): 1999}
    assert (state["held"], state["sold"], state["available"]) == (1, 0, 0)
