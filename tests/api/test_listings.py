"""Listings and bundles (issue 6): a listing maps a storefront product to SKUs; a reservation naming listings
reserves every component all-or-nothing, a component shared by two lines counted once for both (the bug
peers have: each line checked against stock the other line already took). Listings persist in PostgreSQL,
come back with a rebuild, and reconcile compares them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from redis.asyncio import Redis

from app.api.routes.reservations import canonical_body
from app.config import Settings
from app.main import create_app
from app.recovery.rebuild import Rebuilder
from app.recovery.reconcile import compare
from app.stock.idempotency import IdempotencyRequest, fingerprint
from app.stock.keys import KeySpace
from app.stock.reservation_ids import home_shard_of, new_reservation_id
from app.stock.schemas import ReservationRequest
from tests.conftest import TENANT
from tests.helpers import put_sku, sku_state, snapshot


@pytest.fixture(autouse=True)
def _fresh_postgres(pg: asyncpg.Pool) -> None:
    """Listings live in PostgreSQL first: every test starts without any (`pg` empties the tables)."""


def without_streams(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if not key.endswith(":events")}


def stock_keys(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in without_streams(state).items() if ":idem:" not in key}


async def put_listing(client: httpx.AsyncClient, listing: str, *components: tuple[str, int]) -> httpx.Response:
    body = {"components": [{"sku": s, "quantity": q} for s, q in components]}
    return await client.put(f"/v1/listings/{listing}", json=body)


async def reserve(client: httpx.AsyncClient, user: str, *, items: Any = (), listings: Any = ()) -> httpx.Response:
    body = {
        "user_id": user,
        "items": [{"sku": s, "quantity": q} for s, q in items],
        "listings": [{"listing": name, "quantity": q} for name, q in listings],
    }
    return await client.post("/v1/reservations", json=body)


async def test_a_listing_is_created_read_and_replaced(client: httpx.AsyncClient, pg: asyncpg.Pool) -> None:
    created = await put_listing(client, "gift-box", ("tea", 2), ("cup", 1))
    assert created.status_code == 201, created.text
    assert created.json() == {
        "listing": "gift-box",
        "components": [{"sku": "tea", "quantity": 2}, {"sku": "cup", "quantity": 1}],
    }
    assert (await client.get("/v1/listings/gift-box")).json() == created.json()

    replaced = await put_listing(client, "gift-box", ("tea", 1))
    assert replaced.status_code == 200
    assert (await client.get("/v1/listings/gift-box")).json()["components"] == [{"sku": "tea", "quantity": 1}]
    missing = await client.get("/v1/listings/nothing")
    assert (missing.status_code, missing.json()["code"]) == (404, "listing_not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"components": []},
        {"components": [{"sku": "tea", "quantity": 0}]},
        {"components": [{"sku": "tea", "quantity": 1}, {"sku": "tea", "quantity": 2}]},
        {"components": [{"sku": "bad sku", "quantity": 1}]},
        {"components": [{"sku": "tea", "quantity": 1}], "price": 3},
        {},
    ],
)
async def test_a_bad_listing_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, redis: Redis, pg: asyncpg.Pool, body: dict[str, Any]
) -> None:
    assert (await put_listing(client, "gift-box", ("tea", 2))).status_code == 201
    before = (await snapshot(redis), await pg.fetch("SELECT * FROM listing"))

    response = await client.put("/v1/listings/gift-box", json=body)

    assert (response.status_code, response.json()["code"]) == (422, "validation_error")
    assert (await snapshot(redis), await pg.fetch("SELECT * FROM listing")) == before


async def test_a_bundle_reserves_every_component_or_nothing(client: httpx.AsyncClient, redis: Redis) -> None:
    # given a box of 2 tea and 1 cup, with 5 tea and 1 cup in stock
    await put_sku(client, "tea", on_hand=5)
    await put_sku(client, "cup", on_hand=1)
    assert (await put_listing(client, "gift-box", ("tea", 2), ("cup", 1))).status_code == 201

    # when one box is reserved: every component is held
    held = await reserve(client, "ann", listings=[("gift-box", 1)])
    assert held.status_code == 201, held.text
    assert [(i["sku"], i["quantity"]) for i in held.json()["items"]] == [("tea", 2), ("cup", 1)]
    assert ((await sku_state(client, "tea"))["held"], (await sku_state(client, "cup"))["held"]) == (2, 1)

    # and a second box finds the cup gone: refused whole, nothing taken from the tea (tea and cup may live
    # on different shards: the tea's part is then held and undone, which leaves its two events behind)
    before = without_streams(await snapshot(redis))
    refused = await reserve(client, "bob", listings=[("gift-box", 1)])
    assert (refused.status_code, refused.json()["code"]) == (409, "insufficient_stock")
    assert refused.json()["items"] == [{"sku": "cup", "requested": 1, "available": 0}]
    assert without_streams(await snapshot(redis)) == before
    # the reservation is an ordinary one: it is paid and released like any other
    rid = held.json()["id"]
    assert (await client.post(f"/v1/reservations/{rid}/confirm")).json()["status"] == "confirmed"
    assert (await client.get(f"/v1/reservations/{rid}")).json()["items"] == held.json()["items"]


@pytest.mark.parametrize(
    "lines",
    [
        {"listings": [("tea-box", 1), ("tea-and-cup", 1)]},  # two listings sharing a component
        {"items": [("tea", 2)], "listings": [("tea-and-cup", 1)]},  # a SKU line and a listing sharing it
        {"listings": [("tea-box", 2)]},  # one listing twice over
    ],
    ids=["two listings", "a line and a listing", "quantity 2"],
)
async def test_a_shared_component_is_checked_once_for_the_whole_reservation(
    client: httpx.AsyncClient, redis: Redis, lines: dict[str, Any]
) -> None:
    # given 3 tea: enough for either line alone (2 each), not for both (4)
    await put_sku(client, "tea", on_hand=3)
    await put_sku(client, "cup", on_hand=10)
    await put_listing(client, "tea-box", ("tea", 2))
    await put_listing(client, "tea-and-cup", ("tea", 2), ("cup", 1))
    before = await snapshot(redis)

    refused = await reserve(client, "ann", **lines)

    # then the reservation is refused, the shared SKU asked for in total, and nothing is held
    assert (refused.status_code, refused.json()["code"]) == (409, "insufficient_stock"), refused.text
    assert refused.json()["items"] == [{"sku": "tea", "requested": 4, "available": 3}]
    assert await snapshot(redis) == before


async def test_an_unknown_listing_refuses_the_reservation(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, "tea", on_hand=3)
    before = await snapshot(redis)

    refused = await reserve(client, "ann", items=[("tea", 1)], listings=[("ghost", 1)])

    assert (refused.status_code, refused.json()["code"], refused.json()["listing"]) == (
        404,
        "listing_not_found",
        "ghost",
    )
    assert await snapshot(redis) == before


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "ann"},  # no line at all
        {"user_id": "ann", "items": [], "listings": []},
        {"user_id": "ann", "listings": [{"listing": "box", "quantity": 1}, {"listing": "box", "quantity": 2}]},
        {"user_id": "ann", "listings": [{"listing": "box", "quantity": 0}]},
        {"user_id": "ann", "listings": [{"sku": "box", "quantity": 1}]},
    ],
)
async def test_bad_listing_lines_are_refused(client: httpx.AsyncClient, redis: Redis, body: dict[str, Any]) -> None:
    before = await snapshot(redis)
    response = await client.post("/v1/reservations", json=body)
    assert (response.status_code, response.json()["code"]) == (422, "validation_error")
    assert await snapshot(redis) == before


async def test_listings_come_back_with_a_rebuild_and_reconcile_compares_them(
    client: httpx.AsyncClient, redis: Redis, pg: asyncpg.Pool, keys: KeySpace
) -> None:
    # given two listings
    await put_sku(client, "tea", on_hand=3)
    await put_listing(client, "tea-box", ("tea", 2))
    await put_listing(client, "tea-and-cup", ("tea", 1), ("cup", 1))
    shard = keys.shard_of(TENANT, "tea-box")
    before = await redis.get(keys.listing(shard, TENANT, "tea-box"))

    # when Redis loses everything and is rebuilt from PostgreSQL
    await redis.flushdb()
    await Rebuilder(redis, pg, keys).rebuild()

    # then the listings are back, byte for byte, and usable
    assert await redis.get(keys.listing(shard, TENANT, "tea-box")) == before
    assert (await client.get("/v1/listings/tea-and-cup")).json()["components"][1] == {"sku": "cup", "quantity": 1}
    assert [d for d in await compare(redis, pg, keys) if d.field == "components"] == []

    # and reconcile reports a listing Redis changed behind PostgreSQL's back, and one it lost
    await redis.set(keys.listing(shard, TENANT, "tea-box"), '[{"sku":"tea","quantity":9}]')
    await redis.delete(keys.listing(keys.shard_of(TENANT, "tea-and-cup"), TENANT, "tea-and-cup"))
    drift = {(d.sku, d.redis) for d in await compare(redis, pg, keys) if d.field == "components"}
    assert drift == {("tea-box", '[{"sku":"tea","quantity":9}]'), ("tea-and-cup", "-")}


async def test_listings_may_not_expand_past_the_bounds_of_a_reservation(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    # given listings of 20 SKUs each, 1,000 units of every one
    for b in range(3):
        await put_listing(client, f"crate-{b}", *((f"sku-{b}-{i}", 1000) for i in range(20)))
    before = await snapshot(redis)

    # when a reservation would hold 2,000 of one SKU, or 60 SKUs
    too_many_units = await reserve(client, "ann", listings=[("crate-0", 2)])
    too_many_lines = await reserve(client, "ann", listings=[(f"crate-{b}", 1) for b in range(3)])

    # then both are refused before anything is reserved
    for refused, lines, largest in ((too_many_units, 20, 2000), (too_many_lines, 60, 1000)):
        assert (refused.status_code, refused.json()["code"]) == (422, "reservation_too_large"), refused.text
        assert (refused.json()["lines"], refused.json()["largest"]) == (lines, largest)
    assert await snapshot(redis) == before


async def test_a_retry_is_replayed_even_after_its_listing_changed_past_what_it_could_expand_to(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    await put_sku(client, "tea", on_hand=10)
    await put_listing(client, "tea-pair", ("tea", 2))
    body = {"user_id": "ann", "listings": [{"listing": "tea-pair", "quantity": 2}]}
    first = await client.post("/v1/reservations", json=body, headers={"idempotency-key": "pair-1"})
    assert first.status_code == 201, first.text

    # the listing changes so that the same line would now be too large (2 x 600 units of tea)
    await put_listing(client, "tea-pair", ("tea", 600))
    before = await snapshot(redis)
    retry = await client.post("/v1/reservations", json=body, headers={"idempotency-key": "pair-1"})
    fresh = await client.post("/v1/reservations", json=body, headers={"idempotency-key": "pair-2"})

    # the retry gets its first answer; a new request is refused by the listing as it is now
    assert (retry.status_code, retry.content) == (201, first.content)
    assert (fresh.status_code, fresh.json()["code"]) == (422, "reservation_too_large")
    assert stock_keys(await snapshot(redis)) == stock_keys(before)  # only the new key's refusal was recorded
    assert (await sku_state(client, "tea"))["held"] == 4


@pytest_asyncio.fixture
async def no_auto_rebuild(settings: Settings, redis: Redis) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with automatic rebuilds off: a shard without its ready marker stays not ready."""
    application = create_app(settings.model_copy(update={"auto_rebuild": False}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as http:
            yield application, http


async def test_a_listing_on_a_shard_awaiting_its_rebuild_is_a_503_and_the_retry_reserves_under_a_readable_id(
    no_auto_rebuild: tuple[FastAPI, httpx.AsyncClient], redis: Redis, keys: KeySpace
) -> None:
    _, client = no_auto_rebuild
    # a SKU off shard 0 and a listing on another shard
    sku = next(f"soap-{i}" for i in range(100) if keys.shard_of(TENANT, f"soap-{i}") not in (0,))
    box = next(f"box-{i}" for i in range(100) if keys.shard_of(TENANT, f"box-{i}") != keys.shard_of(TENANT, sku))
    await put_sku(client, sku, on_hand=5)
    assert (await put_listing(client, box, (sku, 1))).status_code == 201
    body = {"user_id": "ann", "listings": [{"listing": box, "quantity": 2}]}
    marker = keys.ready(keys.shard_of(TENANT, box))
    await redis.delete(marker)

    refused = await client.post("/v1/reservations", json=body, headers={"idempotency-key": "soap-1"})
    assert (refused.status_code, refused.json()["code"]) == (503, "not_ready")
    await redis.set(marker, '{"source": "tests"}')
    retried = await client.post("/v1/reservations", json=body, headers={"idempotency-key": "soap-1"})

    assert retried.status_code == 201, retried.text
    rid = retried.json()["id"]
    assert home_shard_of(rid, keys.shard_count) == keys.shard_of(TENANT, sku)  # the id names its real home
    assert (await client.get(f"/v1/reservations/{rid}")).json()["status"] == "held"
    assert (await client.post(f"/v1/reservations/{rid}/release")).status_code == 200
    assert (await sku_state(client, sku))["held"] == 0


async def test_a_retry_after_a_crash_answers_the_reservation_made_even_if_its_listing_changed_since(
    app: FastAPI, client: httpx.AsyncClient, redis: Redis, keys: KeySpace
) -> None:
    await put_sku(client, "tea", on_hand=10)
    await put_listing(client, "tea-pair", ("tea", 2))
    body = {"user_id": "ann", "listings": [{"listing": "tea-pair", "quantity": 2}]}
    scope = "POST /v1/reservations"
    request = ReservationRequest.model_validate(body)
    claim = IdempotencyRequest(key="pair-9", scope=scope, fingerprint=fingerprint(scope, canonical_body(request)))
    claimed_id = new_reservation_id(keys.shard_of(TENANT, "tea"))
    await app.state.idempotency.claim(TENANT, claim, claimed_id)
    # the first attempt reserved, then the process died before storing its answer
    await app.state.service.reserve(TENANT, await app.state.service.expand_listings(TENANT, request), claimed_id)
    await put_listing(client, "tea-pair", ("tea", 600))  # the listing no longer expands to what was reserved

    retried = await client.post("/v1/reservations", json=body, headers={"idempotency-key": "pair-9"})

    assert retried.status_code == 201, retried.text
    assert retried.json()["id"] == claimed_id
    assert retried.json()["items"] == [{"sku": "tea", "quantity": 4, "backorder": False, "backordered": 0, "eta": None}]
    assert (await sku_state(client, "tea"))["held"] == 4
