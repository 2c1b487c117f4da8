"""Each transition rule end to end: real reservations, releases, restocks, expiries and presale holds on
real Redis, their events (with av0/av/bo/lbo from the Lua scripts) dispatched and delivered to a
receiver on 127.0.0.1. A receiver subscribed to every type sees exactly the expected events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio

from app.stock.keys import KeySpace
from tests.conftest import SHARDS
from tests.helpers import put_sku, reserve
from tests.webhooks.receiver import Receiver, running

EVERY_TYPE = ["low_stock", "sold_out", "back_in_stock", "presale_opened", "reservation_expired"]


@pytest_asyncio.fixture
async def receiver(wh_client: httpx.AsyncClient) -> AsyncIterator[Receiver]:
    async with running(Receiver()) as r:
        created = await wh_client.post("/v1/webhooks", json={"url": r.url + "/all", "events": EVERY_TYPE})
        assert created.status_code == 201, created.text
        r.secrets["/all"] = created.json()["secret"]
        yield r


async def seen(receiver: Receiver, count: int, settle_s: float = 0.4) -> list[tuple[str, Any]]:
    """(type, sku or reservation) of what arrived, in order of the stock changes, once `count` arrived and
    nothing more came for a while (so an event too many would show)."""
    await receiver.wait_for(lambda: len(receiver.events) >= count, timeout_s=10)
    await asyncio.sleep(settle_s)
    assert all(r.verified for r in receiver.requests)
    bodies = sorted(receiver.events.values(), key=lambda b: (b["created_at"], b["id"]))
    return [(b["type"], b["data"].get("sku") or b["data"].get("reservation_id")) for b in bodies]


async def test_sold_out_then_back_in_stock_by_release_and_by_restock(
    wh_client: httpx.AsyncClient, receiver: Receiver
) -> None:
    await put_sku(wh_client, "tea", on_hand=2)  # created with stock: back in stock (0 -> 2)
    first = await reserve(wh_client, "u1", ("tea", 1))
    second = await reserve(wh_client, "u2", ("tea", 1))  # the last unit: sold out
    assert (await reserve(wh_client, "u3", ("tea", 1))).status_code == 409  # refused: no event at all
    await wh_client.post(f"/v1/reservations/{second.json()['id']}/release")  # back in stock
    await wh_client.post(f"/v1/reservations/{first.json()['id']}/confirm")  # 1 -> 1: nothing
    await reserve(wh_client, "u4", ("tea", 1))  # sold out again
    await asyncio.sleep(0.01)
    restock = await wh_client.post("/v1/skus/tea/adjustments", json={"delta": 5, "reason": "delivery"})
    assert restock.status_code == 200, restock.text  # back in stock

    events = await seen(receiver, 5)

    assert events == [
        ("back_in_stock", "tea"),
        ("sold_out", "tea"),
        ("back_in_stock", "tea"),
        ("sold_out", "tea"),
        ("back_in_stock", "tea"),
    ]
    causes = [b["data"]["cause"] for b in sorted(receiver.events.values(), key=lambda b: (b["created_at"], b["id"]))]
    assert causes == ["sku_set", "held", "released", "held", "adjusted"]
    last = max(receiver.events.values(), key=lambda b: (b["created_at"], b["id"]))
    assert (last["data"]["available_before"], last["data"]["available"]) == (0, 5)


async def test_low_stock_fires_on_crossing_down_only(wh_client: httpx.AsyncClient, receiver: Receiver) -> None:
    await wh_client.put("/v1/skus/cup", json={"on_hand": 0})
    assert (await wh_client.put("/v1/skus/cup/alerts", json={"low_stock_threshold": 3})).status_code == 200
    await wh_client.post("/v1/skus/cup/adjustments", json={"delta": 10, "reason": "stock"})  # back in stock
    await reserve(wh_client, "u1", ("cup", 6))  # 10 -> 4: not yet low
    one = await reserve(wh_client, "u2", ("cup", 1))  # 4 -> 3: low stock
    await reserve(wh_client, "u3", ("cup", 1))  # 3 -> 2: already low, not again
    await wh_client.post(f"/v1/reservations/{one.json()['id']}/release")  # 2 -> 3: going up, nothing
    await wh_client.post("/v1/skus/cup/adjustments", json={"delta": 2, "reason": "stock"})  # 3 -> 5
    await reserve(wh_client, "u4", ("cup", 4))  # 5 -> 1: low stock again

    events = await seen(receiver, 3)

    assert events == [("back_in_stock", "cup"), ("low_stock", "cup"), ("low_stock", "cup")]
    lows = sorted((b for b in receiver.events.values() if b["type"] == "low_stock"), key=lambda b: b["created_at"])
    assert [(b["data"]["available_before"], b["data"]["available"]) for b in lows] == [(4, 3), (5, 1)]
    assert {b["data"]["low_stock_threshold"] for b in lows} == {3}


async def test_presale_opened_on_the_first_backordered_units(wh_client: httpx.AsyncClient, receiver: Receiver) -> None:
    await put_sku(wh_client, "wine", on_hand=1, presale={"cap": 5, "eta": "2027-01-15T09:00:00Z"})
    await reserve(wh_client, "u1", ("wine", 1))  # from on hand: 6 -> 5
    opened = await reserve(wh_client, "u2", ("wine", 2))  # the first backordered units: presale opened
    assert opened.json()["items"][0]["backorder"] is True, opened.text
    await reserve(wh_client, "u3", ("wine", 1))  # more backorder: not again
    await reserve(wh_client, "u4", ("wine", 2))  # the cap reached: sold out

    events = await seen(receiver, 3)

    assert events == [("back_in_stock", "wine"), ("presale_opened", "wine"), ("sold_out", "wine")]
    (body,) = [b for b in receiver.events.values() if b["type"] == "presale_opened"]
    assert body["data"] == {"sku": "wine", "reservation_id": opened.json()["id"], "backordered": 2}


async def test_presale_opened_by_a_sale_deducted_at_payment(wh_client: httpx.AsyncClient, receiver: Receiver) -> None:
    # an on_payment SKU holds nothing: the first backordered units are taken when the payment arrives
    await put_sku(wh_client, "port", on_hand=1, mode="on_payment", presale={"cap": 5, "eta": "2027-01-15T09:00:00Z"})
    pending = await reserve(wh_client, "u1", ("port", 3))
    assert pending.json()["status"] == "pending", pending.text
    paid = await wh_client.post(f"/v1/reservations/{pending.json()['id']}/confirm")
    assert paid.status_code == 200, paid.text

    events = await seen(receiver, 2)

    assert events == [("back_in_stock", "port"), ("presale_opened", "port")]
    (body,) = [b for b in receiver.events.values() if b["type"] == "presale_opened"]
    assert body["data"] == {"sku": "port", "reservation_id": pending.json()["id"], "backordered": 2}


async def test_a_reservation_expiring_on_two_shards_is_delivered_once(
    wh_client: httpx.AsyncClient, receiver: Receiver
) -> None:
    keys = KeySpace(SHARDS)
    other = next(
        f"pot-{i}" for i in range(100) if keys.shard_of("default", f"pot-{i}") != keys.shard_of("default", "jar")
    )
    for sku in ("jar", other):
        await put_sku(wh_client, sku, on_hand=10, hold_ttl_seconds=1)
    held = await reserve(wh_client, "u1", ("jar", 1), (other, 2))
    assert held.status_code == 201, held.text

    events = await seen(receiver, 3, settle_s=1.0)

    assert sorted(events) == [
        ("back_in_stock", "jar"),
        ("back_in_stock", other),
        ("reservation_expired", held.json()["id"]),
    ]
    assert receiver.duplicates == 0 and len(receiver.requests) == 3


async def test_a_split_sku_alerts_on_its_total_not_on_a_bucket(
    wh_client: httpx.AsyncClient, receiver: Receiver
) -> None:
    # given 3 units split over 3 buckets (one each): the moves that spread them change no total to 0
    await put_sku(wh_client, "split-wh", on_hand=3)
    split = await wh_client.put("/v1/skus/split-wh/split", json={"buckets": 3})
    assert split.status_code == 200, split.text

    # when three buyers each empty a bucket, then one releases
    held = []
    for user in ("u1", "u2", "u3"):
        await asyncio.sleep(0.005)  # events on different shards are ordered by their stream time
        response = await reserve(wh_client, user, ("split-wh", 1))
        assert response.status_code == 201, response.text
        held.append(response.json()["id"])
    await asyncio.sleep(0.005)
    assert (await wh_client.post(f"/v1/reservations/{held[0]}/release")).status_code == 200

    # then the SKU (never a bucket) was back in stock, sold out once when the last bucket ran dry, and back
    events = await seen(receiver, 3)
    assert events == [("back_in_stock", "split-wh"), ("sold_out", "split-wh"), ("back_in_stock", "split-wh")]
    sold_out = next(b for b in receiver.events.values() if b["type"] == "sold_out")
    assert (sold_out["data"]["available_before"], sold_out["data"]["available"]) == (1, 0)
