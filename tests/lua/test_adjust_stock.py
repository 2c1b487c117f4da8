"""adjust_stock-3.lua called directly: restock, shrink, SKU_NOT_FOUND, STOCK_CONFLICT and idempotency."""

from __future__ import annotations

import asyncio
import random

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.scripts import Scripts
from tests.helpers import snapshot
from tests.lua.support import (
    IDEM_TTL,
    NO_POLICY,
    NO_PRESALE_STATE,
    NOW,
    TENANT,
    Counters,
    adjust,
    assert_ledger_matches,
    confirm,
    counters,
    counters_of,
    events_of,
    idem_key,
    new_id,
    race,
    reserve,
    set_sku,
)


async def _sku_with_held_and_sold(scripts: Scripts, keys: KeySpace, sku: str, held: int, sold: int) -> None:
    """A SKU of on_hand 10, safety_stock 2 with `held` units held and `sold` sold."""
    await set_sku(scripts, keys, sku, 10, safety=2, limit=7)
    if sold:
        rid = new_id(keys, sku)
        assert (await reserve(scripts, keys, rid, "buyer", [(sku, sold)]))[0] == 0
        assert (await confirm(scripts, keys, rid, [sku]))[:2] == [0, "confirmed"]
    if held:
        assert (await reserve(scripts, keys, new_id(keys, sku), "holder", [(sku, held)]))[0] == 0


async def test_restock_adds_to_on_hand_and_emits_adjusted(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given
    await _sku_with_held_and_sold(scripts, keys, "tea", held=3, sold=1)

    # when
    reply = await adjust(scripts, keys, "tea", 5, reason="delivery 42", now=NOW + 7)

    # then
    assert reply == [0, 15, 2, 3, 1, "pre_reserve", 900, 7, *NO_POLICY, *NO_PRESALE_STATE]
    assert await counters(redis, keys, "tea") == Counters(on_hand=15, safety=2, held=3, sold=1)
    assert (await events_of(redis, keys, "tea"))[-1] == {
        "type": "adjusted",
        "tenant": TENANT,
        "sku": "tea",
        "qty": "5",
        "res": "",
        "user": "",
        "on_hand": "15",
        "held": "3",
        "sold": "1",
        "bo": "0",
        "av0": "4",
        "av": "9",
        "at": str(NOW + 7),
        "reason": "delivery 42",
    }
    await assert_ledger_matches(redis, keys, "tea")


async def test_shrink_down_to_exactly_held_plus_sold_plus_safety(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given on_hand 10, safety 2, held 3, sold 1: 4 units may go
    await _sku_with_held_and_sold(scripts, keys, "coffee", held=3, sold=1)

    # when
    reply = await adjust(scripts, keys, "coffee", -4, reason="breakage")

    # then
    assert reply == [0, 6, 2, 3, 1, "pre_reserve", 900, 7, *NO_POLICY, *NO_PRESALE_STATE]
    state = await counters(redis, keys, "coffee")
    state.check_invariant()
    assert state.available == 0
    last = (await events_of(redis, keys, "coffee"))[-1]
    assert (last["type"], last["qty"], last["reason"]) == ("adjusted", "-4", "breakage")
    assert counters_of(last) == (6, 3, 1)


async def test_stock_conflict_when_the_shrink_goes_below_held_plus_sold(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given on_hand 10, safety 2, held 3, sold 1
    await _sku_with_held_and_sold(scripts, keys, "sugar", held=3, sold=1)
    before = await snapshot(redis)

    # when one unit more than allowed goes
    reply = await adjust(scripts, keys, "sugar", -5)

    # then
    assert reply == [-4, 3, 1, 0, "on_hand"]
    assert await snapshot(redis) == before


async def test_stock_conflict_counts_safety_stock_even_with_nothing_held(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await set_sku(scripts, keys, "salt", 10, safety=4)
    before = await snapshot(redis)

    assert await adjust(scripts, keys, "salt", -7) == [-4, 0, 0, 0, "on_hand"]

    assert await snapshot(redis) == before
    assert (await adjust(scripts, keys, "salt", -6))[:2] == [0, 4]


async def test_sku_not_found_changes_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "other", 1)
    before = await snapshot(redis)

    reply = await adjust(scripts, keys, "missing", 5)

    assert reply == [-1]
    assert await snapshot(redis) == before


async def test_replay_returns_the_first_result_without_adjusting_again(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given a restock under an Idempotency-Key
    await set_sku(scripts, keys, "rice", 10)
    record = idem_key(keys, "rice", "POST /v1/skus/rice/adjustments", "key-1")
    first = await adjust(scripts, keys, "rice", 5, fingerprint="fp-1", idem=record)
    assert first == [0, 15, 0, 0, 0, "pre_reserve", 900, 0, *NO_POLICY, *NO_PRESALE_STATE]
    assert 0 < await redis.ttl(record) <= IDEM_TTL
    before = await snapshot(redis)

    # when the retry arrives
    replay = await adjust(scripts, keys, "rice", 5, fingerprint="fp-1", idem=record)

    # then
    assert replay == first
    assert await snapshot(redis) == before
    assert (await counters(redis, keys, "rice")).on_hand == 15


async def test_replay_of_sku_not_found_is_replayed_even_once_the_sku_exists(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    record = idem_key(keys, "oats", "POST /v1/skus/oats/adjustments", "key-2")
    assert await adjust(scripts, keys, "oats", 5, fingerprint="fp-2", idem=record) == [-1]
    await set_sku(scripts, keys, "oats", 1)

    assert await adjust(scripts, keys, "oats", 5, fingerprint="fp-2", idem=record) == [-1]

    assert (await counters(redis, keys, "oats")).on_hand == 1


async def test_idempotency_conflict_changes_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "flour", 10)
    record = idem_key(keys, "flour", "POST /v1/skus/flour/adjustments", "key-3")
    await adjust(scripts, keys, "flour", 5, fingerprint="fp-a", idem=record)
    before = await snapshot(redis)

    reply = await adjust(scripts, keys, "flour", -1, fingerprint="fp-b", idem=record)

    assert reply == [-8]
    assert await snapshot(redis) == before


async def test_concurrent_shrinks_stop_exactly_at_held_plus_sold(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given on_hand 20 with 10 held: exactly 10 units may go
    await set_sku(scripts, keys, "stock", 20)
    await reserve(scripts, keys, new_id(keys, "stock"), "holder", [("stock", 10)])

    # when 100 one-unit shrinks race
    replies = await asyncio.gather(*(adjust(scripts, keys, "stock", -1) for _ in range(100)))

    # then
    assert sorted(r[1] for r in replies if r[0] == 0) == list(range(10, 20))
    assert [r for r in replies if r[0] != 0] == [[-4, 10, 0, 0, "on_hand"]] * 90
    state = await counters(redis, keys, "stock")
    assert (state.on_hand, state.held, state.sold) == (10, 10, 0)
    assert len([e for e in await events_of(redis, keys, "stock") if e["type"] == "adjusted"]) == 10
    await assert_ledger_matches(redis, keys, "stock")


async def test_concurrent_restocks_shrinks_and_reserves_keep_exact_totals(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given
    await set_sku(scripts, keys, "churn", 30, safety=3)
    rng = random.Random(11)
    deltas = [rng.choice([-3, -2, -1, 1, 2]) for _ in range(150)]
    reserve_ids = [new_id(keys, "churn") for _ in range(60)]

    # when adjustments race one-unit reserves
    adjusted, reserved = await race(
        [adjust(scripts, keys, "churn", d) for d in deltas],
        [reserve(scripts, keys, rid, f"u{i}", [("churn", 1)]) for i, rid in enumerate(reserve_ids)],
    )

    # then on_hand moved by exactly the accepted deltas, held by exactly the granted reserves
    accepted = sum(d for d, r in zip(deltas, adjusted, strict=True) if r[0] == 0)
    assert all(r[0] in (0, -4) for r in adjusted)
    assert all(d < 0 for d, r in zip(deltas, adjusted, strict=True) if r[0] == -4)
    state = await counters(redis, keys, "churn")
    assert state.on_hand == 30 + accepted
    assert state.held == sum(1 for r in reserved if r[0] == 0)
    state.check_invariant()
    for event in await events_of(redis, keys, "churn"):
        on_hand, held, sold = counters_of(event)
        assert held + sold <= on_hand - 3, event
    await assert_ledger_matches(redis, keys, "churn")
