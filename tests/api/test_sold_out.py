"""The sold-out fast path (app/stock/sold_out.py): a process that has seen a SKU sold out refuses it from
memory, with no Redis round trip, and lets go within 100 ms when stock returns through a release, an expiry
or a restock made by another process. The measured delays are printed (run with -s to see them)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.stock.schemas import Adjustment, SkuSettings
from app.stock.service import StockService
from app.stock.sold_out import SoldOutBook
from tests.conftest import TENANT
from tests.helpers import put_sku, req, reserve

BOUND_MS = 100  # the bound; the assertion below allows a loaded CI machine 5x that


def book_of(app: FastAPI) -> SoldOutBook:
    book = app.state.service.sold_out
    assert isinstance(book, SoldOutBook)
    return book


async def sell_out(client: httpx.AsyncClient, app: FastAPI, sku: str, hold_ttl_seconds: int = 900) -> str:
    """One unit, held by `first`; a second buyer's refusal teaches the process it is sold out."""
    await put_sku(client, sku, on_hand=1, hold_ttl_seconds=hold_ttl_seconds)
    held = await reserve(client, "first", (sku, 1))
    assert held.status_code == 201
    assert (await reserve(client, "second", (sku, 1))).status_code == 409
    assert (TENANT, sku) in book_of(app)
    return str(held.json()["id"])


async def ms_until_forgotten(book: SoldOutBook, sku: str, since_ms: int) -> float:
    """Milliseconds from `since_ms` (a Redis stream timestamp: when the change happened) until the book
    lets go of the SKU, polled every millisecond."""
    for _ in range(5000):
        if (TENANT, sku) not in book:
            break
        await asyncio.sleep(0.001)
    else:
        raise AssertionError("the process never saw the stock return")
    return time.time() * 1000 - since_ms


async def last_event_ms(redis: Redis, service: StockService, sku: str, kind: str, missing_ok: bool = False) -> int:
    keys = service.keys
    entries = await redis.xrevrange(keys.events(keys.shard_of(TENANT, sku)), count=20)
    for entry_id, fields in entries:
        if fields["sku"] == sku and fields["type"] == kind:
            return int(str(entry_id).split("-")[0])
    if missing_ok:
        return 0
    raise AssertionError(f"no {kind} event for {sku}")


async def test_a_known_sold_out_sku_is_refused_without_redis(
    client: httpx.AsyncClient, app: FastAPI, redis: Redis
) -> None:
    # given a sold-out SKU this process knows about
    await sell_out(client, app, "bottle")
    hits = book_of(app).hits

    # when Redis stops accepting writes (CLIENT PAUSE WRITE: every stock script would wait), a buyer asks
    await redis.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
    try:
        started = time.monotonic()
        response = await reserve(client, "third", ("bottle", 1))
        elapsed = time.monotonic() - started
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")

    # then the answer came at once, from memory, the same as Redis gives (items with available 0)
    assert elapsed < 1.0, f"answered in {elapsed:.3f}s: the request waited for Redis"
    assert response.status_code == 409
    assert response.json()["code"] == "insufficient_stock"
    assert response.json()["items"] == [{"sku": "bottle", "requested": 1, "available": 0}]
    assert book_of(app).hits == hits + 1


@pytest.mark.parametrize("how", ["release", "restock", "expiry"])
async def test_stock_returning_is_seen_within_100ms(
    client: httpx.AsyncClient, app: FastAPI, redis: Redis, service: StockService, how: str
) -> None:
    # given a SKU this process knows is sold out
    sku = f"bottle-{how}"
    held_id = await sell_out(client, app, sku, hold_ttl_seconds=1 if how == "expiry" else 900)

    # when stock returns through another process (`service` is a second StockService on the same Redis)
    # or, for an expiry, through the sweeper with no request at all
    if how == "release":
        await service.release(TENANT, held_id)
        changed = await last_event_ms(redis, service, sku, "released")
    elif how == "restock":
        await service.adjust(TENANT, sku, Adjustment(delta=1, reason="late delivery"))
        changed = await last_event_ms(redis, service, sku, "adjusted")
    else:
        for _ in range(1000):  # the app's sweeper (every 100 ms in tests) expires the 1 s hold
            if (await service.get_reservation(TENANT, held_id)).status == "expired":
                break
            await asyncio.sleep(0.005)
        seen_ms = int(time.time() * 1000)
        # the in-process worker may have persisted and trimmed the entry already (seen once in a busy full
        # run): then the moment the expiry was seen stands in for it, which can only shorten the delay
        changed = await last_event_ms(redis, service, sku, "expired", missing_ok=True) or seen_ms
    delay = await ms_until_forgotten(book_of(app), sku, changed)

    # then the process sells again within the bound
    print(f"\nsold-out fast path: stock back by {how} seen after {delay:.1f} ms")
    assert delay < 5 * BOUND_MS
    assert (await reserve(client, "third", (sku, 1))).status_code == 201


async def test_a_sku_with_stock_is_never_refused_from_memory(
    client: httpx.AsyncClient, app: FastAPI, service: StockService
) -> None:
    # given a SKU that was sold out, then restocked in the same instant another buyer was refused
    await sell_out(client, app, "mug")
    await service.adjust(TENANT, "mug", Adjustment(delta=5, reason="restock"))
    await service.put_sku(TENANT, "cup", SkuSettings(on_hand=2))

    # then within one refresh every buyer is served again, and SKUs with stock were never remembered
    await asyncio.sleep(0.2)
    results = await asyncio.gather(*(service.reserve(TENANT, req(f"u{i}", ("mug", 1))) for i in range(5)))
    assert len(results) == 5
    assert (await reserve(client, "buyer", ("mug", 1))).status_code == 409  # 6 of 6 sold: learned again
    assert (TENANT, "cup") not in book_of(app)


async def test_a_refresh_that_fails_forgets_everything(client: httpx.AsyncClient, app: FastAPI) -> None:
    # given a book that knows a sold-out SKU, whose Redis connection breaks
    await sell_out(client, app, "bottle")
    book = book_of(app)
    broken = SoldOutBook(Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2), book.keys, refresh_ms=10)
    broken.learn(TENANT, "bottle", 0)
    stop = asyncio.Event()

    # when its refresh runs
    task = asyncio.create_task(broken.run(stop))
    await asyncio.sleep(0.5)
    stop.set()
    await task

    # then it refuses nothing from memory
    assert (TENANT, "bottle") not in broken
    assert broken.refusal(TENANT, req("x", ("bottle", 1)).items) is None


async def test_a_restock_or_release_through_this_process_is_sold_at_once(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    # given a sold-out SKU this process knows about
    held_id = await sell_out(client, app, "bottle")

    # when this process restocks it, the very next reservation is served (no refresh needed)
    restocked = await client.post("/v1/skus/bottle/adjustments", json={"delta": 1, "reason": "found one"})
    assert restocked.status_code == 200
    assert (await reserve(client, "third", ("bottle", 1))).status_code == 201

    # and when it is sold out again, a release through this process frees it at once too
    assert (await reserve(client, "fourth", ("bottle", 1))).status_code == 409
    assert (TENANT, "bottle") in book_of(app)
    assert (await client.post(f"/v1/reservations/{held_id}/release")).status_code == 200
    assert (await reserve(client, "fourth", ("bottle", 1))).status_code == 201


async def test_a_retried_reservation_is_replayed_even_once_the_sku_is_known_sold_out(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    # given the last unit reserved under an Idempotency-Key (its answer lost on the way back)
    await put_sku(client, "bottle", on_hand=1)
    body = {"user_id": "ann", "items": [{"sku": "bottle", "quantity": 1}]}
    first = await client.post("/v1/reservations", json=body, headers={"Idempotency-Key": "ann-1"})
    assert first.status_code == 201
    # and another buyer's refusal has taught this process the SKU is sold out
    assert (await reserve(client, "bob", ("bottle", 1))).status_code == 409
    assert (TENANT, "bottle") in book_of(app)

    # when the checkout retries with the same key, the first answer is replayed, not refused from memory
    retried = await client.post("/v1/reservations", json=body, headers={"Idempotency-Key": "ann-1"})
    assert retried.status_code == 201, retried.text
    assert retried.json()["id"] == first.json()["id"]
