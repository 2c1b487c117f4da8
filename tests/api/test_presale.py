"""Presale / backorder through the API (issue 6): a SKU's `presale: {cap, eta, ends_at?}`, reservation lines
that say `backorder: true` with the ETA, receipts that fill backorders oldest first, the 409 for a cap below
what is promised, bad input refused with nothing changed, the cap reached exactly under HTTP contention, and
the presale's state back from PostgreSQL after Redis loses it, with reconcile watching it."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from app.recovery.rebuild import Rebuilder
from app.recovery.reconcile import compare
from app.stock.keys import KeySpace
from tests.conftest import TENANT
from tests.helpers import put_sku, reserve, sku_state, snapshot

ETA = "2027-01-15T09:00:00Z"
ETA_OUT = "2027-01-15T09:00:00Z"


def presale(cap: int, **extra: Any) -> dict[str, Any]:
    return {"cap": cap, "eta": ETA, **extra}


async def receive(client: httpx.AsyncClient, sku: str, quantity: Any, **extra: Any) -> httpx.Response:
    return await client.post(f"/v1/skus/{sku}/receipts", json={"quantity": quantity}, **extra)


async def shard_state(redis: Redis, shard: int) -> dict[str, Any]:
    """The shard's keys a rebuild restores, without what it does not: the stream, the ready marker's
    time, and a confirmed part's `ce` (its confirm's event ids, which only a retried confirm reads)."""
    state = {}
    for key, value in (await snapshot(redis)).items():
        if key.startswith(f"sh:{{{shard}}}:") and not key.endswith((":events", ":ready")):
            state[key] = {f: v for f, v in value.items() if f != "ce"} if isinstance(value, dict) else value
    return state


async def test_a_sku_with_a_presale_reports_it(client: httpx.AsyncClient) -> None:
    state = await put_sku(client, "wine", on_hand=2, safety_stock=1, presale=presale(3))

    assert state["presale"] == {
        "cap": 3,
        "eta": ETA_OUT,
        "ends_at": None,
        "backordered": 0,
        "open": True,
        "available": 3,
    }
    assert (state["available"], state["backordered"]) == (4, 0)  # 1 on hand (after safety), 3 on backorder
    assert (await sku_state(client, "wine")) == state
    assert (await put_sku(client, "plain", on_hand=2))["presale"] is None


async def test_lines_on_backorder_say_so_with_the_eta(client: httpx.AsyncClient) -> None:
    # given 2 on hand and a presale of 5
    await put_sku(client, "wine", on_hand=2, presale=presale(5))
    await put_sku(client, "cheese", on_hand=10)

    # when a buyer asks for 4 bottles and a cheese
    response = await reserve(client, "ann", ("wine", 4), ("cheese", 1))

    # then the bottles' line is on backorder for 2 of them, the cheese is not
    assert response.status_code == 201, response.text
    wine, cheese = response.json()["items"]
    assert wine == {"sku": "wine", "quantity": 4, "backorder": True, "backordered": 2, "eta": ETA_OUT}
    assert cheese == {"sku": "cheese", "quantity": 1, "backorder": False, "backordered": 0, "eta": None}
    rid = response.json()["id"]
    assert (await client.get(f"/v1/reservations/{rid}")).json()["items"] == [wine, cheese]
    state = await sku_state(client, "wine")
    assert (state["held"], state["backordered"], state["available"]) == (4, 2, 3)
    assert state["presale"]["backordered"] == 2

    # and a paid backorder stays one until the goods arrive
    confirmed = await client.post(f"/v1/reservations/{rid}/confirm")
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["items"][0]["backordered"] == 2


async def test_the_answers_of_confirm_and_release_say_what_is_on_backorder_after_them(
    client: httpx.AsyncClient,
) -> None:
    # given an on_payment SKU with nothing on hand and a presale, and a pending reservation of 2
    await put_sku(client, "preorder", on_hand=0, mode="on_payment", presale=presale(5))
    pending = await reserve(client, "ann", ("preorder", 2))
    assert pending.status_code == 201, pending.text
    assert pending.json()["items"][0]["backorder"] is False  # a pending line holds nothing yet
    rid = pending.json()["id"]

    # when it is paid: deducted directly, on backorder
    confirmed = await client.post(f"/v1/reservations/{rid}/confirm")

    # then the 200 tells the checkout so, with the ETA, as every later read does
    assert confirmed.status_code == 200, confirmed.text
    line = {"sku": "preorder", "quantity": 2, "backorder": True, "backordered": 2, "eta": ETA_OUT}
    assert confirmed.json()["items"] == [line]
    assert (await client.get(f"/v1/reservations/{rid}")).json()["items"] == [line]

    # and given a hold on backorder, when it is released, the answer says nothing is on backorder any more
    await put_sku(client, "held-ahead", on_hand=0, presale=presale(5))
    held = await reserve(client, "bob", ("held-ahead", 3))
    assert held.status_code == 201, held.text
    assert held.json()["items"][0]["backordered"] == 3
    released = await client.post(f"/v1/reservations/{held.json()['id']}/release")
    assert released.status_code == 200, released.text
    gone = {"sku": "held-ahead", "quantity": 3, "backorder": False, "backordered": 0, "eta": None}
    assert released.json()["items"] == [gone]
    assert (await client.get(f"/v1/reservations/{held.json()['id']}")).json()["items"] == [gone]


async def test_a_receipt_fills_backorders_oldest_first(client: httpx.AsyncClient) -> None:
    # given no stock on hand and three backorders of 2, 3 and 1, in that order
    await put_sku(client, "ship", on_hand=0, presale=presale(10))
    ids = []
    for user, qty in (("ann", 2), ("bob", 3), ("cat", 1)):
        response = await reserve(client, user, ("ship", qty))
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])

    # when 4 units arrive
    response = await receive(client, "ship", 4)

    # then ann's line is filled, bob's has 1 left on backorder, cat's waits
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["on_hand"], body["backordered"], body["filled"], body["filled_lines"]) == (4, 2, 4, 2)
    lines = [(await client.get(f"/v1/reservations/{rid}")).json()["items"][0] for rid in ids]
    assert [(ln["backorder"], ln["backordered"]) for ln in lines] == [(False, 0), (True, 1), (True, 1)]
    # held 6: 4 from the goods that came, 2 still coming; the cap has room for 8 more
    assert ((await sku_state(client, "ship"))["held"], body["available"]) == (6, 8)


async def test_a_receipt_is_idempotent_with_a_key(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, "keyed", on_hand=0, presale=presale(4))
    assert (await reserve(client, "ann", ("keyed", 3))).status_code == 201
    headers = {"Idempotency-Key": "delivery-77"}

    first = await receive(client, "keyed", 2, headers=headers)
    before = await snapshot(redis)
    again = await receive(client, "keyed", 2, headers=headers)
    other = await receive(client, "keyed", 3, headers=headers)

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert await snapshot(redis) == before  # the replay booked nothing
    assert (other.status_code, other.json()["code"]) == (422, "idempotency_conflict")


async def test_lowering_the_cap_below_what_is_promised_is_a_conflict(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, "cap", on_hand=0, presale=presale(5))
    assert (await reserve(client, "ann", ("cap", 3))).status_code == 201
    before = await snapshot(redis)

    lowered = await client.put("/v1/skus/cap", json={"on_hand": 0, "presale": presale(2)})
    removed = await client.put("/v1/skus/cap", json={"on_hand": 0})

    for response in (lowered, removed):
        assert response.status_code == 409, response.text
        problem = response.json()
        assert (problem["code"], problem["field"], problem["backordered"]) == ("stock_conflict", "presale.cap", 3)
    assert await snapshot(redis) == before
    assert (await client.put("/v1/skus/cap", json={"on_hand": 0, "presale": presale(3)})).status_code == 200


async def test_after_ends_at_nothing_new_goes_on_backorder(client: httpx.AsyncClient) -> None:
    await put_sku(client, "over", on_hand=1, presale=presale(5, ends_at="2020-01-01T00:00:00Z"))

    state = await sku_state(client, "over")
    refused = await reserve(client, "ann", ("over", 2))

    assert state["presale"]["open"] is False and state["available"] == 1
    assert refused.status_code == 409 and refused.json()["items"] == [{"sku": "over", "requested": 2, "available": 1}]


@pytest.mark.parametrize(
    "body",
    [
        {"on_hand": 1, "presale": {"cap": 0, "eta": ETA}},
        {"on_hand": 1, "presale": {"cap": "5", "eta": ETA}},
        {"on_hand": 1, "presale": {"cap": 5}},
        {"on_hand": 1, "presale": {"cap": 5, "eta": "next week"}},
        {"on_hand": 1, "presale": {"cap": 5, "eta": "2027-01-15T09:00:00"}},  # no time zone
        {"on_hand": 1, "presale": {"cap": 5, "eta": ETA, "arrives": ETA}},
        {"on_hand": 1, "presale": {"cap": 2_000_000_000, "eta": ETA}},
    ],
)
async def test_a_bad_presale_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, redis: Redis, body: dict[str, Any]
) -> None:
    await put_sku(client, "tea", on_hand=3)
    before = await snapshot(redis)

    response = await client.put("/v1/skus/tea", json=body)

    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text
    assert await snapshot(redis) == before


@pytest.mark.parametrize("body", [{"quantity": 0}, {"quantity": -1}, {"quantity": "3"}, {}, {"quantity": 1, "x": 1}])
async def test_a_bad_receipt_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, redis: Redis, body: dict[str, Any]
) -> None:
    await put_sku(client, "tea", on_hand=0, presale=presale(3))
    assert (await reserve(client, "ann", ("tea", 1))).status_code == 201
    before = await snapshot(redis)

    response = await client.post("/v1/skus/tea/receipts", json=body)

    assert (response.status_code, response.json()["code"]) == (422, "validation_error")
    assert await snapshot(redis) == before


async def test_a_receipt_for_an_unknown_sku_is_not_found(client: httpx.AsyncClient) -> None:
    response = await receive(client, "nothing", 1)
    assert (response.status_code, response.json()["code"]) == (404, "sku_not_found")


async def test_the_cap_is_reached_exactly_by_a_crowd_over_http(client: httpx.AsyncClient) -> None:
    # given 20 on hand and a presale of 30, and 300 buyers racing for 1 each, in two waves
    await put_sku(client, "drop", on_hand=20, presale=presale(30))

    responses: list[httpx.Response] = []
    for wave in range(2):
        responses += await asyncio.gather(*(reserve(client, f"u{wave}-{i}", ("drop", 1)) for i in range(150)))

    # then exactly 50 win, 30 of them on backorder, and the rest are told nothing is left
    won = [r for r in responses if r.status_code == 201]
    assert len(won) == 50
    assert sum(r.json()["items"][0]["backorder"] for r in won) == 30
    assert all(r.json()["code"] == "insufficient_stock" for r in responses if r.status_code != 201)
    state = await sku_state(client, "drop")
    assert (state["held"], state["backordered"], state["available"]) == (50, 30, 0)


async def test_backorders_come_back_from_postgresql_and_reconcile_watches_them(
    client: httpx.AsyncClient, redis: Redis, pg: asyncpg.Pool, keys: KeySpace
) -> None:
    # given a presale with backorders, one sold and one partly filled by a receipt, all persisted
    await put_sku(client, "pre", on_hand=1, presale=presale(6, ends_at="2030-01-01T00:00:00Z"))
    ann = (await reserve(client, "ann", ("pre", 3))).json()["id"]  # 1 on hand, 2 on backorder
    bob = (await reserve(client, "bob", ("pre", 2))).json()["id"]  # 2 on backorder
    assert (await client.post(f"/v1/reservations/{ann}/confirm")).status_code == 200
    assert (await receive(client, "pre", 3)).json()["filled_lines"] == 2  # ann's 2, then 1 of bob's
    rebuilder = Rebuilder(redis, pg, keys)
    await rebuilder.drain(list(keys.all_shards()))  # what the worker does, at once
    shard = keys.shard_of(TENANT, "pre")
    before = await shard_state(redis, shard)
    row = await pg.fetchrow("SELECT backordered, presale FROM sku WHERE sku = 'pre'")
    assert row["backordered"] == 1
    lines = dict(await pg.fetch("SELECT reservation_id, backordered FROM reservation_line WHERE sku = 'pre'"))
    assert lines == {ann: 0, bob: 1}
    assert await compare(redis, pg, keys) == []

    # when Redis loses the shard and it is rebuilt from PostgreSQL
    names = [k async for k in redis.scan_iter(match=keys.shard_pattern(shard)) if not k.endswith(":events")]
    await redis.delete(*names)
    assert await rebuilder.rebuild([shard]) == [shard]

    # then the counters, the presale, the lines' backorders and the queue are as they were
    assert await shard_state(redis, shard) == before
    assert (await client.get(f"/v1/reservations/{bob}")).json()["items"][0]["backordered"] == 1

    # and reconcile reports a backordered count that drifts
    await redis.hset(keys.sku(shard, TENANT, "pre"), "backordered", 5)
    drift = await compare(redis, pg, keys)
    assert [(d.sku, d.field, d.redis, d.postgres) for d in drift] == [("pre", "backordered", "5", "1")]


async def test_reconcile_reports_a_backorder_queue_that_lost_an_entry_or_changed_its_order(
    client: httpx.AsyncClient, redis: Redis, pg: asyncpg.Pool, keys: KeySpace
) -> None:
    await put_sku(client, "queued", on_hand=0, presale=presale(9))
    ids = []
    for user in ("ann", "bob", "cat"):
        ids.append((await reserve(client, user, ("queued", 2))).json()["id"])
        await asyncio.sleep(0.005)  # three distinct moments
    await Rebuilder(redis, pg, keys).drain(list(keys.all_shards()))
    queue = keys.backorder_queue(keys.shard_of(TENANT, "queued"), TENANT, "queued")
    at = {str(rid): int(ms) for rid, ms in await redis.zrange(queue, 0, -1, withscores=True)}
    assert list(at) == ids
    assert await compare(redis, pg, keys) == []
    ann, bob, cat = ids

    # a receipt would skip bob: reported where the queues part, with each side's length
    await redis.zrem(queue, bob)
    drift = [(d.sku, d.field, d.redis, d.postgres) for d in await compare(redis, pg, keys)]
    parted = (f"2 entries, #2: {cat}@{at[cat]}", f"3 entries, #2: {bob}@{at[bob]}")
    assert drift == [("queued", "backorder_queue", *parted)]

    # cat ahead of ann: a receipt would fill them in the wrong order
    await redis.zadd(queue, {bob: at[bob], cat: at[ann] - 1})
    drift = [(d.field, d.redis, d.postgres) for d in await compare(redis, pg, keys)]
    assert drift == [("backorder_queue", f"3 entries, #1: {cat}@{at[ann] - 1}", f"3 entries, #1: {ann}@{at[ann]}")]

    await redis.zadd(queue, {cat: at[cat]})
    assert await compare(redis, pg, keys) == []


async def test_a_rebuild_keeps_the_order_lines_went_on_backorder_in(
    client: httpx.AsyncClient, redis: Redis, pg: asyncpg.Pool, keys: KeySpace
) -> None:
    # given a pending reservation (on_payment) made first, then a hold on backorder once the SKU holds,
    # then the pending one paid: deducted directly, on backorder after the hold
    await put_sku(client, "late", on_hand=0, mode="on_payment", presale=presale(5))
    paid_later = (await reserve(client, "ann", ("late", 2))).json()["id"]
    await asyncio.sleep(0.01)
    await put_sku(client, "late", on_hand=0, mode="pre_reserve", presale=presale(5))
    held_first = (await reserve(client, "bob", ("late", 2))).json()["id"]
    await asyncio.sleep(0.01)
    assert (await client.post(f"/v1/reservations/{paid_later}/confirm")).status_code == 200
    shard = keys.shard_of(TENANT, "late")
    queue = keys.backorder_queue(shard, TENANT, "late")
    assert await redis.zrange(queue, 0, -1) == [held_first, paid_later]

    # when Redis loses the shard and it is rebuilt from PostgreSQL
    rebuilder = Rebuilder(redis, pg, keys)
    await rebuilder.drain(list(keys.all_shards()))
    names = [k async for k in redis.scan_iter(match=keys.shard_pattern(shard)) if not k.endswith(":events")]
    await redis.delete(*names)
    assert await rebuilder.rebuild([shard]) == [shard]

    # then the hold is still ahead of the later sale, and a receipt of 2 fills it, not the sale
    assert await redis.zrange(queue, 0, -1) == [held_first, paid_later]
    assert (await receive(client, "late", 2)).status_code == 200
    held = (await client.get(f"/v1/reservations/{held_first}")).json()["items"][0]
    sold = (await client.get(f"/v1/reservations/{paid_later}")).json()["items"][0]
    assert ((held["backorder"], held["backordered"]), (sold["backorder"], sold["backordered"])) == (
        (False, 0),
        (True, 2),
    )
