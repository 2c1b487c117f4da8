"""Killing the service mid-delivery loses no event: a real `stockhold serve` (one process, so its PID is
the whole service), SIGKILLed while

- deliveries are in flight (the receiver holds their requests unanswered, so they never count as done),
- the dispatcher has read stream entries it has not recorded (PostgreSQL's webhook_event is locked by the
  test, so its transaction waits; the entries are pending in the group, unacknowledged), and
- holds are due to expire while no process runs (the next process's sweeper expires them).

After a restart every reservation's reservation_expired event reaches the receiver, signed, and the
outbox has exactly one delivery per reservation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.webhooks.dispatcher import GROUP
from tests.conftest import Servers
from tests.processes import REPO, free_port, stop_process
from tests.webhooks.receiver import Receiver, running

FAST_ENV = {
    "STOCKHOLD_WEBHOOK_RETRY_BASE_S": "0.05",
    "STOCKHOLD_WEBHOOK_RETRY_CAP_S": "0.2",
    "STOCKHOLD_WEBHOOK_POLL_MS": "50",
    "STOCKHOLD_WEBHOOK_TIMEOUT_S": "1",  # the lease of an in-flight delivery: 1 s + 5 s
    "STOCKHOLD_WEBHOOK_CLAIM_IDLE_MS": "500",
    "STOCKHOLD_WEBHOOK_MAX_ATTEMPTS": "50",
}


def _start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:  # a file, not a pipe: an unread pipe fills up and blocks the server
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _log(log_path: Path) -> str:
    return log_path.read_text()


@asynccontextmanager
async def serve(env: dict[str, str], log_path: Path, port: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`stockhold serve --workers 1` (one process) on `port`, once /readyz answers; stopped by its PID."""
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "1"]
    proc = _start(cmd, env, log_path)
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as http:
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/readyz", timeout=1)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, _log(log_path)
                assert time.monotonic() < deadline, _log(log_path)
                await asyncio.sleep(0.2)
        yield proc
    finally:
        stop_process(proc, timeout_s=15)


async def reserve_two_shards(http: httpx.AsyncClient, name: str, ttl: int) -> str:
    """A reservation of two SKUs (on two shards, mostly) held for `ttl` seconds; returns its id."""
    for sku in (f"{name}-a", f"{name}-b"):
        put = await http.put(f"/v1/skus/{sku}", json={"on_hand": 5, "hold_ttl_seconds": ttl})
        assert put.status_code in (200, 201), put.text
    body = {"user_id": name, "items": [{"sku": f"{name}-a", "quantity": 1}, {"sku": f"{name}-b", "quantity": 1}]}
    held = await http.post("/v1/reservations", json=body)
    assert held.status_code == 201, held.text
    return str(held.json()["id"])


async def pending_in_group(redis: Redis, keys: KeySpace) -> int:
    total = 0
    for shard in keys.all_shards():
        total += int((await redis.xpending(keys.events(shard), GROUP))["pending"])
    return total


async def test_killing_the_service_mid_delivery_loses_no_event(
    servers: Servers, redis: Redis, wh_pg: asyncpg.Pool, keys: KeySpace, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        "STOCKHOLD_SHARDS": "16",
        "STOCKHOLD_REQUIRE_AUTH": "false",
        **FAST_ENV,
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    stuck = asyncio.Event()  # never set while the first process lives: its requests stay unanswered
    async with running(Receiver(hold=stuck)) as receiver, httpx.AsyncClient(base_url=base, timeout=10) as http:
        async with serve(env, log, port) as first:
            created = await http.post(
                "/v1/webhooks", json={"url": receiver.url + "/h", "events": ["reservation_expired"]}
            )
            assert created.status_code == 201, created.text
            receiver.secrets["/h"] = created.json()["secret"]

            # phase 1: reservations expire; their deliveries go out and hang at the receiver
            in_flight = [await reserve_two_shards(http, f"one-{i}", ttl=1) for i in range(5)]
            await receiver.wait_for(lambda: len(receiver.requests) >= 5, timeout_s=10)

            # phase 2: the dispatcher reads more expired entries but cannot record them (table locked)
            lock = await wh_pg.acquire()
            locked = lock.transaction()
            await locked.start()
            await lock.execute("LOCK TABLE webhook_event IN ACCESS EXCLUSIVE MODE")
            unrecorded = [await reserve_two_shards(http, f"two-{i}", ttl=1) for i in range(5)]
            # phase 3: holds that fall due while no process runs
            while_down = [await reserve_two_shards(http, f"three-{i}", ttl=4) for i in range(5)]
            deadline = time.monotonic() + 10
            while await pending_in_group(redis, keys) == 0:
                assert time.monotonic() < deadline, "the dispatcher never read the new entries"
                await asyncio.sleep(0.05)
            pending_at_kill = await pending_in_group(redis, keys)

            # when the service is killed by its PID
            os.kill(first.pid, signal.SIGKILL)
            assert first.wait(timeout=10) == -signal.SIGKILL
        await locked.rollback()
        await wh_pg.release(lock)

        # then, as it lies dead: deliveries claimed and unanswered, entries unacknowledged, nothing delivered
        assert receiver.events == {}
        assert pending_at_kill > 0
        assert await pending_in_group(redis, keys) == pending_at_kill
        claimed = await wh_pg.fetchval(
            "SELECT count(*) FROM webhook_delivery WHERE status = 'pending' AND attempts = 1"
        )
        assert claimed == 5

        # when it is started again (a new process: another consumer name), the receiver answering now
        receiver.hold = None
        restarted_at = time.monotonic()
        async with serve(env, log, port):
            expected = {f"evt_{r}_reservation_expired" for r in in_flight + unrecorded + while_down}
            await receiver.wait_for(lambda: expected <= receiver.events.keys(), timeout_s=30)
            took = time.monotonic() - restarted_at
            await asyncio.sleep(0.5)  # anything more would show now

            # then every event arrived, signed, once per reservation in the outbox
            assert set(receiver.events) == expected
            assert all(r.verified for r in receiver.requests)
            rows = await wh_pg.fetch("SELECT event_id, status, attempts FROM webhook_delivery")
            assert sorted(r["event_id"] for r in rows) == sorted(expected)
            assert {r["status"] for r in rows} == {"delivered"}
            # the killed attempts were retried under the same event id (attempt 1 died with the process)
            redone = {r["event_id"]: r["attempts"] for r in rows}
            assert all(redone[f"evt_{r}_reservation_expired"] >= 2 for r in in_flight)
            assert await pending_in_group(redis, keys) == 0
            print(
                f"\nkill -9 mid-delivery: {pending_at_kill} stream entries unacknowledged and 5 deliveries in flight "
                f"at the kill; all {len(expected)} events delivered {took:.1f} s after the restart began"
            )
        stuck.set()


async def test_delivery_latency_against_a_real_serve(
    servers: Servers, redis: Redis, wh_pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """From a stock event's XADD to the receiver, with the service in its own process (stream entry ids
    are Redis's clock, the receiver's the same machine's)."""
    env = {
        **os.environ,
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        "STOCKHOLD_SHARDS": "16",
        "STOCKHOLD_REQUIRE_AUTH": "false",
    }
    port = free_port()
    async with (
        running(Receiver()) as receiver,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
        serve(env, tmp_path / "serve.log", port),
    ):
        created = await http.post("/v1/webhooks", json={"url": receiver.url + "/h", "events": ["sold_out"]})
        receiver.secrets["/h"] = created.json()["secret"]
        n = 50
        for i in range(n):  # each SKU sold out by one reservation: one sold_out event each, a few ms apart
            assert (await http.put(f"/v1/skus/lat-{i}", json={"on_hand": 1})).status_code == 201
            assert (
                await http.post(
                    "/v1/reservations", json={"user_id": "u", "items": [{"sku": f"lat-{i}", "quantity": 1}]}
                )
            ).status_code == 201
        await receiver.wait_for(lambda: len(receiver.events) == n, timeout_s=15)

        rows = await wh_pg.fetch("SELECT id, stream_id FROM webhook_event")
        xadd_ms = {r["id"]: int(r["stream_id"].split("-")[0]) for r in rows}
        latencies = sorted(r.at * 1000 - xadd_ms[r.event_id] for r in receiver.requests if r.status == 200)
        print(
            f"\nsold_out delivery latency against `stockhold serve`, stream entry -> receiver, {n} events: "
            f"median {latencies[n // 2]:.1f} ms, p90 {latencies[int(n * 0.9)]:.1f} ms, max {latencies[-1]:.1f} ms"
        )
        assert len(latencies) == n and all(r.verified for r in receiver.requests)
        assert latencies[n // 2] < 500
