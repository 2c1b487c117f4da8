"""Many buyers at once through the HTTP API: the counters never oversell."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx

from tests.helpers import put_sku, reserve, sku_state


async def test_2000_buyers_one_bottle_exactly_one_winner(client: httpx.AsyncClient) -> None:
    # given
    await put_sku(client, "last-bottle", on_hand=1)

    # when 2,000 distinct users race for it
    responses = await asyncio.gather(*(reserve(client, f"user-{i}", ("last-bottle", 1)) for i in range(2000)))

    # then
    outcomes = Counter((r.status_code, r.json().get("code") or r.json().get("status")) for r in responses)
    assert outcomes == {(201, "held"): 1, (409, "insufficient_stock"): 1999}
    state = await sku_state(client, "last-bottle")
    assert (state["held"], state["sold"], state["available"]) == (1, 0, 0)


async def test_100_units_random_quantities_never_above_stock(client: httpx.AsyncClient) -> None:
    # given
    await put_sku(client, "flash-100", on_hand=100)
    rng = random.Random(7)
    quantities = [rng.randint(1, 3) for _ in range(300)]  # demand ~600 units, 6x the stock

    # when
    responses = await asyncio.gather(
        *(reserve(client, f"buyer-{i}", ("flash-100", q)) for i, q in enumerate(quantities))
    )

    # then held never exceeds 100 and, demand exceeding supply, reaches exactly 100
    granted = sum(q for q, r in zip(quantities, responses, strict=True) if r.status_code == 201)
    refused = [r for r in responses if r.status_code != 201]
    assert all(r.status_code == 409 and r.json()["code"] == "insufficient_stock" for r in refused)
    state = await sku_state(client, "flash-100")
    assert granted == state["held"] == 100
    assert state["available"] == 0
    # every refusal told the truth: what was asked exceeded what was left
    assert all(r.json()["items"][0]["available"] < r.json()["items"][0]["requested"] for r in refused)


async def test_one_user_50_parallel_requests_gets_at_most_the_limit(client: httpx.AsyncClient) -> None:
    # given
    await put_sku(client, "limited", on_hand=1000, per_user_limit=2)

    # when one scalper fires 50 requests at once
    responses = await asyncio.gather(*(reserve(client, "scalper", ("limited", 1)) for _ in range(50)))

    # then
    codes = Counter(r.json().get("code", "held") for r in responses)
    assert codes == {"held": 2, "limit_exceeded": 48}
    assert (await sku_state(client, "limited"))["held"] == 2
    refusal = next(r for r in responses if r.status_code == 409).json()
    assert (refusal["limit"], refusal["units"]) == (2, 2)


async def test_limit_counts_across_reservations_and_frees_on_release(client: httpx.AsyncClient) -> None:
    await put_sku(client, "limited", on_hand=10, per_user_limit=2)
    first = await reserve(client, "ann", ("limited", 2))
    assert first.status_code == 201
    assert (await reserve(client, "ann", ("limited", 1))).json()["code"] == "limit_exceeded"
    # bought units keep counting...
    await client.post(f"/v1/reservations/{first.json()['id']}/confirm")
    assert (await reserve(client, "ann", ("limited", 1))).json()["code"] == "limit_exceeded"
    # ...released ones do not
    await put_sku(client, "other", on_hand=5, per_user_limit=2)
    held = await reserve(client, "ann", ("other", 2))
    await client.post(f"/v1/reservations/{held.json()['id']}/release")
    assert (await reserve(client, "ann", ("other", 2))).status_code == 201
