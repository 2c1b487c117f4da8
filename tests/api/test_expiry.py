"""Holds that expire with no client touching the SKU, and paying after expiry."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.helpers import put_sku, reserve, sku_state


async def test_expired_hold_stops_counting_within_2s_with_no_requests(client: httpx.AsyncClient) -> None:
    # given a hold with a 1 s deadline
    await put_sku(client, "quick", on_hand=5, hold_ttl_seconds=1)
    held = await reserve(client, "dave", ("quick", 3))
    assert held.status_code == 201
    assert (await sku_state(client, "quick"))["available"] == 2
    started = time.monotonic()

    # when nobody calls the service for 2 s (only the background sweeper runs)
    await asyncio.sleep(2.0)

    # then the units are back and the reservation says expired
    elapsed = time.monotonic() - started
    state = await sku_state(client, "quick")
    assert (state["held"], state["available"]) == (0, 5), f"still held after {elapsed:.2f}s"
    assert (await client.get(f"/v1/reservations/{held.json()['id']}")).json()["status"] == "expired"


async def test_pay_after_expiry_with_stock_free_deducts_directly(client: httpx.AsyncClient) -> None:
    await put_sku(client, "late-pay", on_hand=2, hold_ttl_seconds=1)
    rid = (await reserve(client, "erin", ("late-pay", 1))).json()["id"]
    await _wait_for_status(client, rid, "expired")

    confirmed = await client.post(f"/v1/reservations/{rid}/confirm")

    assert confirmed.status_code == 200
    assert confirmed.json()["status"] == "confirmed"
    state = await sku_state(client, "late-pay")
    # sold directly: no new hold was created
    assert (state["held"], state["sold"], state["available"]) == (0, 1, 1)


async def test_pay_after_expiry_when_stock_was_taken_is_refused(client: httpx.AsyncClient) -> None:
    await put_sku(client, "late-pay", on_hand=1, hold_ttl_seconds=1)
    rid = (await reserve(client, "erin", ("late-pay", 1))).json()["id"]
    await _wait_for_status(client, rid, "expired")
    # another buyer takes the unit the expiry freed
    assert (await reserve(client, "frank", ("late-pay", 1))).status_code == 201
    before = await sku_state(client, "late-pay")

    refused = await client.post(f"/v1/reservations/{rid}/confirm")

    assert refused.status_code == 409
    assert refused.json()["code"] == "insufficient_stock"
    assert await sku_state(client, "late-pay") == before
    assert (await client.get(f"/v1/reservations/{rid}")).json()["status"] == "expired"


async def test_release_after_expiry_is_idempotent(client: httpx.AsyncClient) -> None:
    await put_sku(client, "late-release", on_hand=1, hold_ttl_seconds=1)
    rid = (await reserve(client, "gina", ("late-release", 1))).json()["id"]
    await _wait_for_status(client, rid, "expired")
    released = await client.post(f"/v1/reservations/{rid}/release")
    assert released.status_code == 200
    assert released.json()["status"] == "expired"
    assert (await sku_state(client, "late-release"))["available"] == 1


async def _wait_for_status(client: httpx.AsyncClient, rid: str, status: str) -> None:
    async with asyncio.timeout(5.0):
        # polling is the point: the state changes in the sweeper, not through anything we could await
        while (await client.get(f"/v1/reservations/{rid}")).json()["status"] != status:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
