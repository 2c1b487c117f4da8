"""Deduction modes: pre_reserve (hold with a deadline), on_order (hold, no deadline), on_payment
(nothing held; confirm deducts and may fail)."""

from __future__ import annotations

import asyncio

import httpx

from app.stock.sweeper import ExpirySweeper
from tests.helpers import put_sku, reserve, sku_state

FAR_FUTURE_MS = 10**13


async def test_on_order_holds_never_expire(client: httpx.AsyncClient, sweeper: ExpirySweeper) -> None:
    await put_sku(client, "made-to-order", on_hand=3, mode="on_order", hold_ttl_seconds=1)
    held = await reserve(client, "hank", ("made-to-order", 2))
    assert held.status_code == 201
    assert held.json()["status"] == "held"
    assert held.json()["expires_at"] is None

    await asyncio.sleep(1.5)  # past the SKU's ttl: the background sweeper has run many times
    await sweeper.sweep_once(now=FAR_FUTURE_MS)  # and even a sweep at the end of time

    assert (await sku_state(client, "made-to-order"))["held"] == 2
    assert (await client.get(f"/v1/reservations/{held.json()['id']}")).json()["status"] == "held"


async def test_on_payment_reserve_is_pending_and_confirm_deducts(client: httpx.AsyncClient) -> None:
    await put_sku(client, "pay-first", on_hand=2, mode="on_payment")
    pending = await reserve(client, "iris", ("pay-first", 2))
    assert pending.status_code == 201
    assert pending.json()["status"] == "pending"
    assert pending.json()["expires_at"] is None
    assert (await sku_state(client, "pay-first"))["held"] == 0

    confirmed = await client.post(f"/v1/reservations/{pending.json()['id']}/confirm")

    assert confirmed.json()["status"] == "confirmed"
    state = await sku_state(client, "pay-first")
    assert (state["held"], state["sold"], state["available"]) == (0, 2, 0)


async def test_on_payment_reserve_checks_availability(client: httpx.AsyncClient) -> None:
    await put_sku(client, "pay-first", on_hand=1, mode="on_payment")
    refused = await reserve(client, "iris", ("pay-first", 2))
    assert refused.status_code == 409
    assert refused.json()["code"] == "insufficient_stock"


async def test_on_payment_confirm_fails_cleanly_when_sold_out(client: httpx.AsyncClient) -> None:
    await put_sku(client, "pay-first", on_hand=1, mode="on_payment")
    first = (await reserve(client, "jack", ("pay-first", 1))).json()["id"]
    second = (await reserve(client, "kate", ("pay-first", 1))).json()["id"]  # both pending: nothing held
    assert (await client.post(f"/v1/reservations/{first}/confirm")).status_code == 200
    before = await sku_state(client, "pay-first")

    late = await client.post(f"/v1/reservations/{second}/confirm")

    assert late.status_code == 409
    assert late.json()["code"] == "insufficient_stock"
    assert await sku_state(client, "pay-first") == before
    assert (await client.get(f"/v1/reservations/{second}")).json()["status"] == "pending"


async def test_on_payment_many_payers_one_unit(client: httpx.AsyncClient) -> None:
    await put_sku(client, "pay-first", on_hand=1, mode="on_payment")
    ids = [(await reserve(client, f"payer-{i}", ("pay-first", 1))).json()["id"] for i in range(30)]
    results = await asyncio.gather(*(client.post(f"/v1/reservations/{rid}/confirm") for rid in ids))
    assert sorted(r.status_code for r in results) == [200] + [409] * 29
    assert (await sku_state(client, "pay-first"))["sold"] == 1


async def test_mixed_modes_in_one_reservation(client: httpx.AsyncClient) -> None:
    # a pre_reserve line gives the whole reservation its deadline; an on_payment line holds nothing
    await put_sku(client, "timed", on_hand=2, hold_ttl_seconds=600)
    await put_sku(client, "pay-line", on_hand=2, mode="on_payment")
    mixed = await reserve(client, "lena", ("timed", 1), ("pay-line", 1))
    assert mixed.json()["status"] == "held"
    assert mixed.json()["expires_at"] is not None
    assert (await sku_state(client, "pay-line"))["held"] == 0
    assert (await client.post(f"/v1/reservations/{mixed.json()['id']}/confirm")).status_code == 200
    assert (await sku_state(client, "timed"))["sold"] == 1
    assert (await sku_state(client, "pay-line"))["sold"] == 1
