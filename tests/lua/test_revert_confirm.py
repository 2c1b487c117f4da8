"""revert_confirm.lua called directly: undoing a confirm from a hold and a direct one exactly, 'nothing to
revert', RESERVATION_NOT_FOUND, and races."""

from __future__ import annotations

import asyncio
from collections import Counter

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.scripts import Scripts
from tests.helpers import snapshot
from tests.lua.support import (
    FAR_FUTURE,
    NOW,
    TENANT,
    assert_ledger_matches,
    confirm,
    counters,
    events,
    expire_holds,
    expiry_index,
    new_id,
    part,
    race,
    release,
    reserve,
    revert_confirm,
    set_sku,
    skus_on_one_shard,
    user_units,
)


def _without_stream(state: dict[str, object], keys: KeySpace, shard: int) -> dict[str, object]:
    return {k: v for k, v in state.items() if k != keys.events(shard)}


async def test_hold_confirm_reverts_to_held_exactly(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a held part (one held line, one on_payment line) confirmed from its hold
    timed, paid = skus_on_one_shard(keys, "rv", 2)
    shard = keys.shard_of(TENANT, timed)
    await set_sku(scripts, keys, timed, 10, ttl=60, limit=5)
    await set_sku(scripts, keys, paid, 10, mode="on_payment", limit=5)
    rid = new_id(keys, timed)
    await reserve(scripts, keys, rid, "ann", [(timed, 2), (paid, 3)])
    before_confirm = await snapshot(redis)
    ledger_before = len(await events(redis, keys, shard))
    assert (await confirm(scripts, keys, rid, [timed, paid]))[:2] == [0, "confirmed"]

    # when
    reply = await revert_confirm(scripts, keys, rid, [timed, paid], now=NOW + 9)

    # then counters, per-user units, part (st, no pst/cf) and expiry index are as before the confirm
    assert reply == [0, "held"]
    assert _without_stream(await snapshot(redis), keys, shard) == _without_stream(before_confirm, keys, shard)
    assert await expiry_index(redis, keys, shard) == {rid: NOW + 60_000}
    ledger = await events(redis, keys, shard)
    assert len(ledger) == ledger_before + 4
    assert ledger[-2] == {
        "type": "unconfirmed",
        "tenant": TENANT,
        "sku": timed,
        "qty": "2",
        "res": rid,
        "user": "ann",
        "on_hand": "10",
        "held": "2",
        "sold": "0",
        "bo": "0",
        "av0": "8",
        "av": "8",
        "at": str(NOW + 9),
        "lbo": "0",
        "st": "held",
    }
    assert (ledger[-1]["type"], ledger[-1]["sku"], ledger[-1]["held"], ledger[-1]["sold"]) == (
        "unsold",  # the on_payment line was deducted directly: its units return to available
        paid,
        "0",
        "0",
    )


async def test_direct_confirm_of_a_pending_part_reverts_to_pending(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await set_sku(scripts, keys, "app", 5, mode="on_payment", limit=3)
    shard = keys.shard_of(TENANT, "app")
    rid = new_id(keys, "app")
    await reserve(scripts, keys, rid, "bob", [("app", 3)])
    before_confirm = await snapshot(redis)
    await confirm(scripts, keys, rid, ["app"])
    assert await user_units(redis, keys, "app") == {"bob": 3}

    assert await revert_confirm(scripts, keys, rid, ["app"]) == [0, "pending"]

    assert _without_stream(await snapshot(redis), keys, shard) == _without_stream(before_confirm, keys, shard)
    assert await user_units(redis, keys, "app") == {}
    assert await expiry_index(redis, keys, shard) == {}


async def test_direct_confirm_of_an_expired_part_reverts_to_expired(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await set_sku(scripts, keys, "map", 5, ttl=1)
    shard = keys.shard_of(TENANT, "map")
    rid = new_id(keys, "map")
    await reserve(scripts, keys, rid, "cy", [("map", 2)])
    await expire_holds(scripts, keys, shard, [(rid, ["map"])], now=FAR_FUTURE)
    before_confirm = await snapshot(redis)
    await confirm(scripts, keys, rid, ["map"], now=FAR_FUTURE)

    assert await revert_confirm(scripts, keys, rid, ["map"], now=FAR_FUTURE) == [0, "expired"]

    assert _without_stream(await snapshot(redis), keys, shard) == _without_stream(before_confirm, keys, shard)
    state = await counters(redis, keys, "map")
    assert (state.held, state.sold) == (0, 0)
    assert await expiry_index(redis, keys, shard) == {}  # an expired part does not re-enter the index


async def test_hold_without_deadline_reverts_outside_the_expiry_index(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await set_sku(scripts, keys, "kit", 5, mode="on_order")
    rid = new_id(keys, "kit")
    await reserve(scripts, keys, rid, "dee", [("kit", 2)])
    await confirm(scripts, keys, rid, ["kit"])

    assert await revert_confirm(scripts, keys, rid, ["kit"]) == [0, "held"]

    state = await counters(redis, keys, "kit")
    assert (state.held, state.sold) == (2, 0)
    assert await expiry_index(redis, keys, keys.shard_of(TENANT, "kit")) == {}
    assert await user_units(redis, keys, "kit") == {"dee": 2}


async def test_reverted_hold_past_its_deadline_is_expired_by_the_next_sweep(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await set_sku(scripts, keys, "gem", 5, ttl=1)
    shard = keys.shard_of(TENANT, "gem")
    rid = new_id(keys, "gem")
    await reserve(scripts, keys, rid, "eli", [("gem", 2)])
    await confirm(scripts, keys, rid, ["gem"], now=FAR_FUTURE)
    await revert_confirm(scripts, keys, rid, ["gem"], now=FAR_FUTURE)
    assert await expiry_index(redis, keys, shard) == {rid: NOW + 1_000}

    assert await expire_holds(scripts, keys, shard, [(rid, ["gem"])], now=FAR_FUTURE) == [1, 0]

    assert (await counters(redis, keys, "gem")).held == 0
    assert await user_units(redis, keys, "gem") == {}


async def test_nothing_to_revert_when_not_confirmed(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "cog", 5)
    held, released = new_id(keys, "cog"), new_id(keys, "cog")
    await reserve(scripts, keys, held, "fay", [("cog", 1)])
    await reserve(scripts, keys, released, "fay", [("cog", 1)])
    await release(scripts, keys, released, ["cog"])
    before = await snapshot(redis)

    assert await revert_confirm(scripts, keys, held, ["cog"]) == [1, "held"]
    assert await revert_confirm(scripts, keys, released, ["cog"]) == [1, "released"]

    assert await snapshot(redis) == before


async def test_nothing_to_revert_the_second_time(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "nut", 5, mode="on_payment")
    rid = new_id(keys, "nut")
    await reserve(scripts, keys, rid, "gus", [("nut", 1)])
    await confirm(scripts, keys, rid, ["nut"])
    assert await revert_confirm(scripts, keys, rid, ["nut"]) == [0, "pending"]
    before = await snapshot(redis)

    assert await revert_confirm(scripts, keys, rid, ["nut"]) == [1, "pending"]

    assert await snapshot(redis) == before


async def test_reservation_not_found_when_no_part_exists(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "rod", 5)
    before = await snapshot(redis)

    assert await revert_confirm(scripts, keys, new_id(keys, "rod"), ["rod"]) == [-5]

    assert await snapshot(redis) == before


async def test_reservation_not_found_when_a_named_sku_is_not_a_line(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    line, stranger = skus_on_one_shard(keys, "rvn", 2)
    await set_sku(scripts, keys, line, 5)
    await set_sku(scripts, keys, stranger, 5)
    rid = new_id(keys, line)
    await reserve(scripts, keys, rid, "hal", [(line, 1)])
    await confirm(scripts, keys, rid, [line])
    before = await snapshot(redis)

    assert await revert_confirm(scripts, keys, rid, [stranger]) == [-5]

    assert await snapshot(redis) == before


async def test_reservation_not_found_when_lines_are_missing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a part of two lines confirmed from its hold
    first, second = skus_on_one_shard(keys, "rvs", 2)
    await set_sku(scripts, keys, first, 5)
    await set_sku(scripts, keys, second, 5)
    rid = new_id(keys, first)
    await reserve(scripts, keys, rid, "ivy", [(first, 1), (second, 2)])
    await confirm(scripts, keys, rid, [first, second])
    before = await snapshot(redis)

    # when the caller's view misses a line
    reply = await revert_confirm(scripts, keys, rid, [first])

    # then it is refused: reverting anyway puts the part back to 'held' with `second`'s 2 units still sold,
    # and expiring that part later takes 2 from `second`'s held (which is 0) a second time
    assert reply == [-5]
    assert await snapshot(redis) == before


async def test_concurrent_reverts_of_one_part_revert_once(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    a, b = skus_on_one_shard(keys, "rvc", 2)
    await set_sku(scripts, keys, a, 10)
    await set_sku(scripts, keys, b, 10, mode="on_payment")
    rid = new_id(keys, a)
    await reserve(scripts, keys, rid, "jon", [(a, 3), (b, 4)])
    await confirm(scripts, keys, rid, [a, b])

    replies = await asyncio.gather(*(revert_confirm(scripts, keys, rid, [a, b]) for _ in range(100)))

    assert sorted(replies) == [[0, "held"]] + [[1, "held"]] * 99
    assert [(c.held, c.sold) for c in [await counters(redis, keys, s) for s in (a, b)]] == [(3, 0), (0, 0)]
    assert await user_units(redis, keys, a) == {"jon": 3}
    assert await user_units(redis, keys, b) == {}
    kinds = Counter(e["type"] for e in await events(redis, keys, keys.shard_of(TENANT, a)) if e["res"] == rid)
    assert (kinds["unconfirmed"], kinds["unsold"]) == (1, 1)


async def test_reverts_racing_confirms_keep_exact_totals(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given 20 paid one-unit orders selling out a pay-first SKU, and 60 more buyers pending
    await set_sku(scripts, keys, "pay", 20, mode="on_payment")
    paid = [new_id(keys, "pay") for _ in range(20)]
    waiting = [new_id(keys, "pay") for _ in range(60)]
    for i, rid in enumerate(paid + waiting):
        await reserve(scripts, keys, rid, f"u{i}", [("pay", 1)])
    for rid in paid:
        assert (await confirm(scripts, keys, rid, ["pay"]))[:2] == [0, "confirmed"]

    # when 15 paid orders are reverted while the 60 waiting buyers pay
    reverted, payments = await race(
        [revert_confirm(scripts, keys, rid, ["pay"]) for rid in paid[:15]],
        [confirm(scripts, keys, rid, ["pay"]) for rid in waiting],
    )

    # then sold = 20 - 15 + the payments that found a freed unit, never more than the stock
    assert reverted == [[0, "pending"]] * 15
    late = sum(1 for r in payments if r[0] == 0)
    assert all(r[0] == 0 or r == [-2, 1, 0, 0] for r in payments)
    state = await counters(redis, keys, "pay")
    assert (state.held, state.sold) == (0, 5 + late)
    assert late <= 15
    state.check_invariant()
    assert sum((await user_units(redis, keys, "pay")).values()) == state.sold
    statuses = Counter([(await part(redis, keys, rid, "pay"))["st"] for rid in paid + waiting])
    assert statuses == {"confirmed": 5 + late, "pending": 75 - late}
    await assert_ledger_matches(redis, keys, "pay")
