"""The README's one-bottle flash sale, step by step through the HTTP API."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from redis.asyncio import Redis

from tests.helpers import put_sku, reserve, sku_state


async def test_one_bottle_two_buyers_one_winner(client: httpx.AsyncClient) -> None:
    # given one bottle
    created = await client.put("/v1/skus/moutai-1935", json={"on_hand": 1, "per_user_limit": 1})
    assert created.status_code == 201
    assert created.json()["available"] == 1

    # when two buyers race for it
    alice = await reserve(client, "alice", ("moutai-1935", 1))
    bob = await reserve(client, "bob", ("moutai-1935", 1))

    # then exactly one wins
    assert alice.status_code == 201
    assert alice.json()["status"] == "held"
    assert alice.json()["expires_at"] is not None
    assert bob.status_code == 409
    assert bob.headers["content-type"] == "application/problem+json"
    problem = bob.json()
    assert problem["code"] == "insufficient_stock"
    assert problem["items"] == [{"sku": "moutai-1935", "requested": 1, "available": 0}]
    assert {"type", "title", "status", "detail", "code"} <= problem.keys()
    assert (await sku_state(client, "moutai-1935"))["held"] == 1

    # the winner pays
    rid = alice.json()["id"]
    confirmed = await client.post(f"/v1/reservations/{rid}/confirm")
    assert confirmed.status_code == 200
    assert confirmed.json()["status"] == "confirmed"
    state = await sku_state(client, "moutai-1935")
    assert (state["held"], state["sold"], state["available"]) == (0, 1, 0)
    # confirming again answers 200 again; releasing a paid reservation is refused
    assert (await client.post(f"/v1/reservations/{rid}/confirm")).status_code == 200
    refused = await client.post(f"/v1/reservations/{rid}/release")
    assert refused.status_code == 409
    assert refused.json()["code"] == "reservation_confirmed"


async def test_release_returns_stock(client: httpx.AsyncClient) -> None:
    await put_sku(client, "gift-box", on_hand=3)
    held = await reserve(client, "carol", ("gift-box", 2))
    assert (await sku_state(client, "gift-box"))["available"] == 1

    rid = held.json()["id"]
    released = await client.post(f"/v1/reservations/{rid}/release")
    assert released.status_code == 200
    assert released.json()["status"] == "released"
    assert (await sku_state(client, "gift-box"))["available"] == 3
    # idempotent
    again = await client.post(f"/v1/reservations/{rid}/release")
    assert again.status_code == 200
    assert (await sku_state(client, "gift-box"))["available"] == 3
    fetched = await client.get(f"/v1/reservations/{rid}")
    assert fetched.json()["status"] == "released"
    paid_late = await client.post(f"/v1/reservations/{rid}/confirm")
    assert paid_late.status_code == 409
    assert paid_late.json()["code"] == "reservation_released"


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"redis": "ok", "postgres": "ok", "rebuilt": "ok", "sweeper": "ok"}
    docs = await client.get("/openapi.json")
    assert "/v1/reservations/{reservation_id}/confirm" in docs.json()["paths"]


async def test_redis_unavailable_is_503_not_ready(app: FastAPI, client: httpx.AsyncClient) -> None:
    # given a service whose Redis stops answering (port 1: nothing listens there)
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    live = app.state.service.redis
    app.state.service.redis = dead
    try:
        # when
        response = await client.get("/v1/skus/anything")
    finally:
        app.state.service.redis = live
        await dead.aclose()

    # then
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["code"] == "not_ready"
