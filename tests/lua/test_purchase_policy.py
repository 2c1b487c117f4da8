"""The purchase policy enforced by the scripts: max_per_order, eligibility rules and the hoarding cooldown
(reserve.lua refuses, release.lua and expire_holds.lua record lapses). Every refusal changes nothing."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.scripts import Scripts
from tests.helpers import snapshot
from tests.lua.support import (
    NOW,
    TENANT,
    counters,
    expire_holds,
    new_id,
    release,
    reserve,
    set_sku,
    skus_on_one_shard,
)

MINUTE = 60_000


def policy(
    max_per_order: int = 0,
    min_age: int = 0,
    min_orders: int = 0,
    min_member: int = 0,
    cooldown: tuple[int, int, int] = (0, 0, 0),
) -> tuple[int, ...]:
    return (max_per_order, min_age, min_orders, min_member, *cooldown)


async def test_max_per_order_caps_one_reservation(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a SKU selling at most 2 per reservation
    await set_sku(scripts, keys, "bottle", 100, policy=policy(max_per_order=2))
    before = await snapshot(redis)

    # when one reservation asks for 3
    reply = await reserve(scripts, keys, new_id(keys, "bottle"), "ann", [("bottle", 3)])

    # then it is refused, naming the cap, and nothing changed
    assert reply == [-13, 1, 2]
    assert await snapshot(redis) == before
    # and 2 is fine, as often as stock allows (the cap is per reservation, not per user)
    for _ in range(3):
        assert (await reserve(scripts, keys, new_id(keys, "bottle"), "ann", [("bottle", 2)]))[0] == 0
    assert (await counters(redis, keys, "bottle")).held == 6


@pytest.mark.parametrize(
    ("rules", "buyer", "refusal"),
    [
        # each rule against a missing fact, a fact one short, and a fact exactly at the minimum
        (policy(min_age=30), ("", "", ""), ["min_account_age_days", 30, ""]),
        (policy(min_age=30), (29, 5, 5), ["min_account_age_days", 30, 29]),
        (policy(min_age=30), (30, "", ""), None),
        (policy(min_orders=1), (400, "", 400), ["min_orders", 1, ""]),
        (policy(min_orders=1), (400, 0, 400), ["min_orders", 1, 0]),
        (policy(min_orders=1), ("", 1, ""), None),
        (policy(min_member=7), (400, 3, ""), ["min_member_days", 7, ""]),
        (policy(min_member=7), (400, 3, 6), ["min_member_days", 7, 6]),
        (policy(min_member=7), ("", "", 7), None),
        # several rules: the first failing one is named, in a fixed order
        (policy(min_age=30, min_orders=2, min_member=7), (10, 0, 0), ["min_account_age_days", 30, 10]),
        (policy(min_age=30, min_orders=2, min_member=7), (31, 1, 0), ["min_orders", 2, 1]),
        (policy(min_age=30, min_orders=2, min_member=7), (31, 2, 7), None),
        # no rule: no fact is needed
        (policy(), ("", "", ""), None),
    ],
)
async def test_eligibility_rules(
    redis: Redis,
    scripts: Scripts,
    keys: KeySpace,
    rules: tuple[int, ...],
    buyer: tuple[int | str, ...],
    refusal: list[object] | None,
) -> None:
    # given a SKU with eligibility rules
    await set_sku(scripts, keys, "moutai", 10, policy=rules)
    before = await snapshot(redis)

    # when a buyer with these facts reserves
    reply = await reserve(scripts, keys, new_id(keys, "moutai"), "ann", [("moutai", 1)], buyer=buyer)

    # then
    if refusal is None:
        assert reply[0] == 0
        assert (await counters(redis, keys, "moutai")).held == 1
    else:
        assert reply == [-11, 1, *refusal]
        assert await snapshot(redis) == before


async def test_a_refused_line_refuses_the_whole_part_and_beats_a_shortage(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given two SKUs on one shard: the first sold out, the second requiring account age
    open_sku, strict_sku = skus_on_one_shard(keys, "pair", 2)
    await set_sku(scripts, keys, open_sku, 0)
    await set_sku(scripts, keys, strict_sku, 10, policy=policy(min_age=30))
    before = await snapshot(redis)

    # when a new account reserves both
    rid = new_id(keys, open_sku)
    reply = await reserve(scripts, keys, rid, "ann", [(open_sku, 1), (strict_sku, 1)], buyer=(1, 0, 0))

    # then the policy refusal is what the buyer hears (no stock would change their eligibility)
    assert reply == [-11, 2, "min_account_age_days", 30, 1]
    assert await snapshot(redis) == before


async def _hold_and_release(scripts: Scripts, keys: KeySpace, sku: str, user: str, now: int) -> None:
    rid = new_id(keys, sku)
    assert (await reserve(scripts, keys, rid, user, [(sku, 1)], now=now))[0] == 0
    assert (await release(scripts, keys, rid, [sku], now=now + 1))[:2] == [0, "released"]


async def test_released_holds_start_a_cooldown_after_k_lapses_within_the_window(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given a SKU whose users get a 30-minute cooldown after 3 lapses within 10 minutes
    await set_sku(scripts, keys, "gpu", 10, policy=policy(cooldown=(3, 10, 30)))

    # when ann holds and releases 3 times within the window
    for i in range(3):
        await _hold_and_release(scripts, keys, "gpu", "ann", NOW + i * MINUTE)
    before = await snapshot(redis)

    # then her next hold is refused until 30 minutes after the third lapse, changing nothing
    lapse = NOW + 2 * MINUTE + 1
    reply = await reserve(scripts, keys, new_id(keys, "gpu"), "ann", [("gpu", 1)], now=lapse + 29 * MINUTE)
    assert reply == [-12, 1, lapse + 30 * MINUTE]
    assert await snapshot(redis) == before
    # and bob, who never let a hold lapse, is not affected
    assert (await reserve(scripts, keys, new_id(keys, "gpu"), "bob", [("gpu", 1)], now=lapse))[0] == 0
    # and once the cooldown is over, ann may hold again
    reply = await reserve(scripts, keys, new_id(keys, "gpu"), "ann", [("gpu", 1)], now=lapse + 30 * MINUTE)
    assert reply[0] == 0


async def test_lapses_further_apart_than_the_window_do_not_add_up(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given a cooldown after 2 lapses within 10 minutes
    await set_sku(scripts, keys, "gpu", 10, policy=policy(cooldown=(2, 10, 30)))

    # when ann's lapses are 11 minutes apart
    for i in range(4):
        await _hold_and_release(scripts, keys, "gpu", "ann", NOW + i * 11 * MINUTE)

    # then she is never cooled down
    reply = await reserve(scripts, keys, new_id(keys, "gpu"), "ann", [("gpu", 1)], now=NOW + 34 * MINUTE)
    assert reply[0] == 0


async def test_expired_holds_count_as_lapses(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a SKU with a 1-minute hold and a cooldown after 2 lapses within 10 minutes
    await set_sku(scripts, keys, "gpu", 10, ttl=60, policy=policy(cooldown=(2, 10, 5)))
    shard = keys.shard_of(TENANT, "gpu")

    # when two of ann's holds expire unpaid (the sweeper's call)
    for i in range(2):
        rid = new_id(keys, "gpu")
        start = NOW + i * 2 * MINUTE
        assert (await reserve(scripts, keys, rid, "ann", [("gpu", 1)], now=start))[0] == 0
        assert await expire_holds(scripts, keys, shard, [(rid, ["gpu"])], now=start + MINUTE) == [1, 0]

    # then she is cooled down for 5 minutes from the second expiry
    second = NOW + 3 * MINUTE
    reply = await reserve(scripts, keys, new_id(keys, "gpu"), "ann", [("gpu", 1)], now=second + MINUTE)
    assert reply == [-12, 1, second + 5 * MINUTE]
    # and the hoarding record lives no longer than the rule needs (the longer of window and cooldown)
    ttl = await redis.pttl(keys.lapses(shard, TENANT, "gpu"))
    assert 0 < ttl <= 10 * MINUTE


async def test_undo_and_skus_without_a_cooldown_record_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given one SKU with a cooldown (after 1 lapse) and one without
    await set_sku(scripts, keys, "gpu", 10, policy=policy(cooldown=(1, 10, 30)))
    await set_sku(scripts, keys, "tea", 10)

    # when a compensation undoes ann's hold on the first, and she releases a hold on the second
    rid = new_id(keys, "gpu")
    assert (await reserve(scripts, keys, rid, "ann", [("gpu", 1)]))[0] == 0
    assert (await release(scripts, keys, rid, ["gpu"], how="undo"))[:2] == [0, "undone"]
    await _hold_and_release(scripts, keys, "tea", "ann", NOW)

    # then no hoarding record exists and she may hold both
    for sku in ("gpu", "tea"):
        assert not await redis.exists(keys.lapses(keys.shard_of(TENANT, sku), TENANT, sku))
        assert (await reserve(scripts, keys, new_id(keys, sku), "ann", [(sku, 1)]))[0] == 0
