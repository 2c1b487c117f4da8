"""Sales channels through the API (issue 6): `PUT /v1/skus/{sku}/channels/{channel}`, a channel's availability
with `GET /v1/skus/{sku}?channel=`, 2,000 concurrent buyers across three channels never breaking a quota,
bad input refused with nothing changed, and channels back from PostgreSQL after Redis loses them."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.recovery.rebuild import Rebuilder
from app.recovery.reconcile import compare
from app.stock.keys import KeySpace
from tests.conftest import TENANT
from tests.helpers import put_sku, reserve, sku_state, snapshot


async def put_channel(client: httpx.AsyncClient, sku: str, channel: str, **body: Any) -> httpx.Response:
    return await client.put(f"/v1/skus/{sku}/channels/{channel}", json=body)


async def test_a_channel_is_created_and_reports_its_availability(client: httpx.AsyncClient) -> None:
    await put_sku(client, "tea", on_hand=10)

    created = await put_channel(client, "tea", "web", quota=4, priority=5)
    updated = await put_channel(client, "tea", "web", quota=3, priority=5, borrow=False)

    assert created.status_code == 201, created.text
    assert updated.status_code == 200, updated.text
    body = updated.json()
    assert (body["channel"], body["available"], body["available_total"]) == ("web", 3, 10)
    assert body["channels"] == [
        {"channel": "web", "quota": 3, "used": 0, "priority": 5, "borrow": False, "fenced": 3, "available": 3}
    ]
    plain = await sku_state(client, "tea")
    assert (plain["channel"], plain["available"], plain["available_total"]) == (None, 7, 10)  # 3 are fenced


async def test_a_channel_reservation_draws_on_its_quota_and_others_cannot(client: httpx.AsyncClient) -> None:
    # given 6 on hand: 4 fenced for the app, which may not borrow
    await put_sku(client, "cup", on_hand=6)
    assert (await put_channel(client, "cup", "app", quota=4, borrow=False)).status_code == 201

    # then the web shop (no quota) may take only the 2 shared, the app its 4
    web = await reserve(client, "ann", ("cup", 3), channel="web")
    assert web.status_code == 409, web.text
    assert web.json()["items"] == [{"sku": "cup", "requested": 3, "available": 2}]
    assert (await reserve(client, "ann", ("cup", 2), channel="web")).status_code == 201
    assert (await reserve(client, "bob", ("cup", 4), channel="app")).status_code == 201
    state = (await client.get("/v1/skus/cup", params={"channel": "app"})).json()
    assert (state["available"], state["channels"][0]["used"]) == (0, 4)


async def test_a_quota_below_what_is_used_is_a_conflict(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, "box", on_hand=10)
    await put_channel(client, "box", "web", quota=5)
    assert (await reserve(client, "ann", ("box", 3), channel="web")).status_code == 201
    before = await snapshot(redis)

    response = await put_channel(client, "box", "web", quota=2)

    assert response.status_code == 409
    assert (response.json()["code"], response.json()["used"]) == ("stock_conflict", 3)
    assert await snapshot(redis) == before


@pytest.mark.parametrize(
    "body",
    [
        {"quota": -1},
        {"quota": "3"},
        {},
        {"quota": 1, "priority": -1},
        {"quota": 1, "borrow": "yes"},
        {"quota": 1, "x": 1},
    ],
)
async def test_a_bad_channel_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, redis: Redis, body: dict[str, Any]
) -> None:
    await put_sku(client, "tea", on_hand=3)
    before = await snapshot(redis)

    response = await client.put("/v1/skus/tea/channels/web", json=body)

    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text
    assert await snapshot(redis) == before


async def test_a_bad_channel_name_or_an_unknown_sku_is_refused(client: httpx.AsyncClient) -> None:
    await put_sku(client, "tea", on_hand=3)
    assert (await client.put("/v1/skus/tea/channels/bad%20name", json={"quota": 1})).status_code == 422
    assert (await client.get("/v1/skus/tea", params={"channel": "bad name"})).status_code == 422
    missing = await put_channel(client, "nothing", "web", quota=1)
    assert (missing.status_code, missing.json()["code"]) == (404, "sku_not_found")


async def test_2000_buyers_across_three_channels_never_break_a_quota(client: httpx.AsyncClient) -> None:
    # given 300 units: web 100 (may borrow), app 80 (may not), market 50 (may borrow), 70 shared
    await put_sku(client, "drop", on_hand=300)
    quotas = {"web": (100, True), "app": (80, False), "market": (50, True)}
    for channel, (quota, borrow) in quotas.items():
        assert (await put_channel(client, "drop", channel, quota=quota, borrow=borrow)).status_code == 201

    # when 2,000 buyers, spread over the three channels, race for 1 unit each, in waves of 250
    rng = random.Random(6)
    routes = [rng.choice(list(quotas)) for _ in range(2000)]
    responses: list[httpx.Response] = []
    for wave in range(0, 2000, 250):
        calls = [reserve(client, f"u{i}", ("drop", 1), channel=routes[i]) for i in range(wave, wave + 250)]
        responses += await asyncio.gather(*calls)

    # then every unit went exactly once, the app only ever had its quota, no channel took more than its
    # quota from it, and the refusals were all for stock
    won = {
        channel: sum(1 for r, c in zip(responses, routes, strict=True) if c == channel and r.status_code == 201)
        for channel in quotas
    }
    assert sum(won.values()) == 300
    assert won["app"] == 80
    assert all(r.json()["code"] == "insufficient_stock" for r in responses if r.status_code != 201)
    state = await sku_state(client, "drop")
    assert (state["held"], state["available_total"]) == (300, 0)
    used = {c["channel"]: c["used"] for c in state["channels"]}
    assert used == {"web": 100, "app": 80, "market": 50}  # every quota used up, each within itself


async def test_channels_come_back_from_postgresql_and_reconcile_watches_them(
    client: httpx.AsyncClient, redis: Redis, pg: asyncpg.Pool, keys: KeySpace
) -> None:
    # given two channels, one changed twice, and live holds from one of them, all persisted
    await put_sku(client, "pre", on_hand=10)
    await put_channel(client, "pre", "web", quota=3)
    await put_channel(client, "pre", "web", quota=5, priority=2)
    await put_channel(client, "pre", "app", quota=2, borrow=False)
    web = (await reserve(client, "ann", ("pre", 4), channel="web")).json()["id"]
    assert (await reserve(client, "bob", ("pre", 1), channel="app")).status_code == 201
    rebuilder = Rebuilder(redis, pg, keys)
    await rebuilder.drain(list(keys.all_shards()))
    rows = await pg.fetch("SELECT channel, quota, priority, borrow FROM sku_channel WHERE sku = 'pre' ORDER BY 1")
    assert [tuple(r) for r in rows] == [("app", 2, 0, False), ("web", 5, 2, True)]
    assert await pg.fetchval("SELECT from_quota FROM reservation_line WHERE reservation_id = $1", web) == 4
    assert await compare(redis, pg, keys) == []
    shard = keys.shard_of(TENANT, "pre")
    before = (await sku_state(client, "pre"), await redis.hgetall(keys.channels(shard, TENANT, "pre")))

    # when Redis loses the shard and it is rebuilt
    names = [k async for k in redis.scan_iter(match=keys.shard_pattern(shard)) if not k.endswith(":events")]
    await redis.delete(*names)
    assert await rebuilder.rebuild([shard]) == [shard]

    # then the channels, with what each used, are as they were, and a release still gives quota back
    assert (await sku_state(client, "pre"), await redis.hgetall(keys.channels(shard, TENANT, "pre"))) == before
    assert (await client.post(f"/v1/reservations/{web}/release")).status_code == 200
    assert {c["channel"]: c["used"] for c in (await sku_state(client, "pre"))["channels"]} == {"app": 1, "web": 0}

    # and reconcile reports a channel's used count that drifts
    await rebuilder.drain(list(keys.all_shards()))
    await redis.hset(keys.channels(shard, TENANT, "pre"), "u:app", 2)
    drift = await compare(redis, pg, keys)
    assert [(d.sku, d.field, d.redis, d.postgres) for d in drift] == [("pre", "channels u:app", "2", "1")]


async def test_a_refusal_for_want_of_shared_stock_does_not_teach_sold_out(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    # given 3 units, all fenced for the app
    await put_sku(client, "fence", on_hand=3)
    await put_channel(client, "fence", "app", quota=3, borrow=False)
    book = app.state.service.sold_out
    assert book is not None

    # when a reservation naming no channel is refused (nothing shared)
    refused = await reserve(client, "ann", ("fence", 1))
    assert (refused.status_code, refused.json()["items"][0]["available"]) == (409, 0)

    # then the process does not take the SKU for sold out: the app still gets its units
    assert (TENANT, "fence") not in book
    assert (await reserve(client, "bob", ("fence", 3), channel="app")).status_code == 201
    assert (await reserve(client, "cat", ("fence", 1), channel="app")).status_code == 409
    assert (TENANT, "fence") in book  # now nothing is left for anyone
