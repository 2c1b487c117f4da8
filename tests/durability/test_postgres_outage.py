"""PostgreSQL stopped for 10 s during a stream of reservations and confirms: holds keep being granted,
confirms get 503, nothing is lost, the backlog drains after it returns, and reconcile reports zero drift.

Real processes: a PostgreSQL of this test's own (stopped and started again on the same data directory,
so on the same socket and URL), the session's Redis, and `stockhold serve` with two API processes, each
running the write-behind worker in-process. Everything this test starts it stops, by PID, in `finally`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.worker.consumer import GROUP
from app.worker.status import pipeline_status
from tests.conftest import Servers, embedded_data_dir
from tests.durability.test_durable_confirm import PrivatePostgres
from tests.processes import stockhold_serve

REPO = Path(__file__).resolve().parents[2]
TENANT = "default"
OUTAGE_S = 10.0
BEFORE_S = 2.0  # traffic with PostgreSQL up, before the outage
AFTER_S = 2.0  # traffic once it is back
DRAIN_BOUND_S = 15.0  # the backlog must be gone this long after traffic stops (a worker step retries in 1 s)
CLIENTS = 4


@dataclass
class Stack:
    base_url: str
    postgres: PrivatePostgres
    env: dict[str, str]
    log_path: Path


@pytest.fixture
def stack(servers: Servers, redis: Redis, tmp_path: Path) -> Iterator[Stack]:  # `redis`: flushed, shards ready
    with ExitStack() as exits:
        postgres = PrivatePostgres(embedded_data_dir(exits) / "postgres")
        exits.callback(postgres.stop)  # before the directory goes (last in, first out)
        postgres.start()
        env = {
            **os.environ,
            "REDIS_URL": servers.redis_url,
            "DATABASE_URL": postgres.url,
            "STOCKHOLD_SHARDS": "16",
            "STOCKHOLD_REQUIRE_AUTH": "false",
        }
        log_path = tmp_path / "server.log"
        with stockhold_serve(env, log_path) as base:
            yield Stack(base, postgres, env, log_path)


@dataclass
class Call:
    kind: str  # 'reserve' or 'confirm'
    rid: str
    status: int
    body: dict[str, Any]
    retry_after: str | None
    started: float
    ended: float


def skus_on_distinct_shards(keys: KeySpace, count: int) -> list[str]:
    chosen: dict[int, str] = {}
    i = 0
    while len(chosen) < count:
        chosen.setdefault(keys.shard_of(TENANT, f"outage-{i}"), f"outage-{i}")
        i += 1
    return list(chosen.values())


async def entries_added(redis: Redis, keys: KeySpace) -> int:
    total = 0
    for shard in keys.all_shards():
        if await redis.exists(keys.events(shard)):
            total += int((await redis.xinfo_stream(keys.events(shard)))["entries-added"])
    return total


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=stack.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_postgres_outage_loses_nothing(stack: Stack, redis: Redis) -> None:
    keys = KeySpace(16)
    a, b, c, d = skus_on_distinct_shards(keys, 4)
    # three shapes of reservation: one shard, two shards, and on_payment (pending; confirm deducts)
    shapes = [[(a, 1)], [(b, 1), (c, 2)], [(d, 1)]]
    calls: list[Call] = []
    stop_traffic = asyncio.Event()

    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as http:
        for sku in (a, b, c):
            assert (await http.put(f"/v1/skus/{sku}", json={"on_hand": 1_000_000})).status_code == 201
        put = await http.put(f"/v1/skus/{d}", json={"on_hand": 1_000_000, "mode": "on_payment"})
        assert put.status_code == 201

        async def call(kind: str, rid: str, method: str, url: str, **kw: Any) -> Call:
            started = time.monotonic()
            try:
                r = await http.request(method, url, **kw)
                status, retry_after = r.status_code, r.headers.get("retry-after")
                try:
                    body = r.json()
                except ValueError:  # not JSON (a bare server error page): recorded, judged below
                    body = {"text": r.text}
            except httpx.HTTPError as exc:  # the server dropped the connection: recorded, judged below
                status, body, retry_after = 0, {"error": repr(exc)}, None
            done = Call(kind, rid, status, body, retry_after, started, time.monotonic())
            calls.append(done)
            return done

        async def buyer(n: int) -> None:
            i = 0
            while not stop_traffic.is_set():  # a reservation and its confirm, always as a pair
                items = [{"sku": s, "quantity": q} for s, q in shapes[(n + i) % len(shapes)]]
                held = await call(
                    "reserve", "", "POST", "/v1/reservations", json={"user_id": f"u{n}-{i}", "items": items}
                )
                if held.status == 201:
                    held.rid = held.body["id"]
                    await call("confirm", held.rid, "POST", f"/v1/reservations/{held.rid}/confirm")
                i += 1
                await asyncio.sleep(0.1)  # a steady trickle: hundreds of pairs, not thousands

        buyers = [asyncio.create_task(buyer(n)) for n in range(CLIENTS)]
        try:
            await asyncio.sleep(BEFORE_S)
            await asyncio.to_thread(stack.postgres.stop)
            down_from = time.monotonic()
            await asyncio.sleep(1.0)
            # while it is down: not ready (PostgreSQL failing), metrics still answer with a growing backlog
            ready = await http.get("/readyz")
            metrics = await http.get("/metrics")
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_from)))
            up_from = time.monotonic()
            await asyncio.to_thread(stack.postgres.start)
            up_at = time.monotonic()
            await asyncio.sleep(AFTER_S)
        finally:
            stop_traffic.set()
            await asyncio.wait_for(asyncio.gather(*buyers), timeout=15)
            traffic_stopped = time.monotonic()

        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["postgres"].startswith("failed"), ready.json()
        assert metrics.status_code == 200, metrics.text
        waiting = [
            s.value
            for family in text_string_to_metric_families(metrics.text)
            if family.name in ("stockhold_stream_pending", "stockhold_stream_undelivered")
            for s in family.samples
        ]
        assert sum(waiting) > 0, "holds were granted during the outage: their events wait for PostgreSQL"

        reserves = [x for x in calls if x.kind == "reserve"]
        confirms = [x for x in calls if x.kind == "confirm"]
        granted = {x.rid: x.body for x in reserves if x.status == 201}
        # confirms not answered 200: 503 expected during the outage (anything else is judged at the end)
        unsold = sorted({x.rid for x in confirms if x.status != 200})
        refused = sorted({x.rid for x in confirms if x.status == 503})
        # the refused ones are still as reserved: held (or pending), with their deadline
        assert {granted[rid]["status"] for rid in refused} <= {"held", "pending"}
        gate = asyncio.Semaphore(16)

        async def still_as_reserved(rid: str) -> None:
            async with gate:
                now = (await http.get(f"/v1/reservations/{rid}")).json()
            assert (now["status"], now["expires_at"]) == (granted[rid]["status"], granted[rid]["expires_at"]), now

        await asyncio.gather(*(still_as_reserved(rid) for rid in refused))

        # PostgreSQL is back: retrying them (and any other confirm not answered 200) sells them
        async def retry(rid: str) -> None:
            async with gate:
                retried = await http.post(f"/v1/reservations/{rid}/confirm")
            assert retried.status_code == 200, retried.text
            assert retried.json()["status"] == "confirmed"

        await asyncio.gather(*(retry(rid) for rid in unsold))

    # the backlog drains: nothing unpersisted on any shard within the bound (from when traffic stopped)
    pool = await asyncpg.create_pool(stack.postgres.url, min_size=1, max_size=2)
    assert pool is not None
    try:
        while True:
            status = await pipeline_status(redis, pool, keys)
            left = {s.shard: (s.backlog.pending, s.backlog.undelivered) for s in status if s.backlog.unpersisted}
            if not left:
                break
            if time.monotonic() - traffic_stopped > DRAIN_BOUND_S:
                idle = [
                    int(e["time_since_delivered"])
                    for shard in left
                    for e in await redis.xpending_range(keys.events(shard), GROUP, "-", "+", 1000)
                ]
                raise AssertionError(
                    f"{DRAIN_BOUND_S:g}s after traffic stopped ({time.monotonic() - up_at:.1f}s after PostgreSQL "
                    f"returned) still unpersisted, (pending, undelivered) by shard: {left}; pending entries idle "
                    f"{min(idle, default=0) / 1000:.1f}-{max(idle, default=0) / 1000:.1f}s"
                )
            await asyncio.sleep(0.25)

        # nothing lost: every event ever added to a stream is in the ledger, once
        assert await pool.fetchval("SELECT count(*) FROM stock_movement") == await entries_added(redis, keys)
        assert {r["id"] for r in await pool.fetch("SELECT id FROM reservation")} == set(granted)
        lines = await pool.fetch("SELECT status, count(*) AS n FROM reservation_line GROUP BY status")
        assert {r["status"]: r["n"] for r in lines} == {"confirmed": sum(len(g["items"]) for g in granted.values())}
    finally:
        await pool.close()

    status_cmd = cli(stack, "status")
    assert status_cmd.returncode == 0, status_cmd.stdout + status_cmd.stderr
    assert "total: 0 events not yet in PostgreSQL" in status_cmd.stdout, status_cmd.stdout
    reconcile = cli(stack, "reconcile")
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    assert "no drift" in reconcile.stdout, reconcile.stdout

    # The HTTP contract while PostgreSQL was away (checked last, so a breach of it still lets the checks
    # above say whether anything was lost).
    # holds keep being granted, before, during and after the outage
    assert {(x.status, x.body.get("code")) for x in reserves} == {(201, None)}, [
        (x.status, x.body) for x in reserves if x.status != 201
    ][:5]
    during = [x for x in reserves if x.started >= down_from and x.ended <= up_from]
    assert len(during) >= 20, f"only {len(during)} reservations during the outage"
    # every confirm is a sale or a 503 ledger_unavailable with Retry-After, never anything else
    odd = [(x.status, x.body) for x in confirms if x.status not in (200, 503)]
    assert not odd, f"{len(odd)} confirm(s) answered neither 200 nor 503: {odd[:3]}"
    for x in confirms:
        if x.status != 503:
            continue
        assert x.body["code"] == "ledger_unavailable", x.body
        assert x.retry_after is not None and int(x.retry_after) > 0, x
    # a confirm made wholly inside the outage is refused; one made once PostgreSQL is back is a sale
    inside = [x for x in confirms if x.started >= down_from and x.ended <= up_from]
    assert len(inside) >= 20, f"only {len(inside)} confirms during the outage"
    assert all(x.status == 503 for x in inside), [(x.status, x.body) for x in inside if x.status != 503][:3]
    after = [x for x in confirms if x.started >= up_at]
    assert after and all(x.status == 200 for x in after), [(x.status, x.body) for x in after if x.status != 200]
