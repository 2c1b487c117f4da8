"""confirm.lua called directly: from a hold, by direct deduction (pending, expired, on_payment lines), ALREADY,
RESERVATION_NOT_FOUND, RESERVATION_RELEASED, LIMIT_EXCEEDED and INSUFFICIENT_STOCK, and races."""

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
    events_of,
    expire_holds,
    expiry_index,
    new_id,
    part,
    race,
    release,
    reserve,
    set_sku,
    skus_on_one_shard,
    user_units,
)


async def test_held_part_moves_held_units_to_sold(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a hold of 3
    await set_sku(scripts, keys, "shoe", 10, ttl=60, limit=5)
    rid = new_id(keys, "shoe")
    shard = keys.shard_of(TENANT, "shoe")
    await reserve(scripts, keys, rid, "ann", [("shoe", 3)])

    # when
    reply = await confirm(scripts, keys, rid, ["shoe"], now=NOW + 10)

    # then: the reply names the events it emitted, for confirm's write-through to PostgreSQL
    emitted = await redis.xrange(keys.events(shard), min=reply[2], max=reply[3])
    assert reply[:2] == [0, "confirmed"] and [fields["type"] for _, fields in emitted] == ["confirmed"]
    assert (await part(redis, keys, rid, "shoe"))["ce"] == f"{reply[2]} {reply[3]}"
    assert await confirm(scripts, keys, rid, ["shoe"], now=NOW + 11) == [1, "confirmed", reply[2], reply[3]]
    state = await counters(redis, keys, "shoe")
    assert (state.on_hand, state.held, state.sold) == (10, 0, 3)
    assert await user_units(redis, keys, "shoe") == {"ann": 3}  # held + bought: unchanged
    stored = await part(redis, keys, rid, "shoe")
    assert (stored["st"], stored["pst"], stored["cf"]) == ("confirmed", "held", "h")
    assert await expiry_index(redis, keys, shard) == {}
    assert (await events(redis, keys, shard))[-1] == {
        "type": "confirmed",
        "tenant": TENANT,
        "sku": "shoe",
        "qty": "3",
        "res": rid,
        "user": "ann",
        "on_hand": "10",
        "held": "0",
        "sold": "3",
        "bo": "0",
        "av0": "7",
        "av": "7",
        "at": str(NOW + 10),
        "lbo": "0",
        "lq": "0",  # units from a channel's quota: the reservation named none
        "st": "confirmed",  # the part's status after, for the ledger's projections
        "pst": "held",
        "cf": "h",
    }


async def test_held_part_deducts_its_on_payment_lines_directly(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a held part with one held line and one on_payment line
    timed, paid = skus_on_one_shard(keys, "half", 2)
    await set_sku(scripts, keys, timed, 5)
    await set_sku(scripts, keys, paid, 5, mode="on_payment")
    rid = new_id(keys, timed)
    assert (await reserve(scripts, keys, rid, "bob", [(timed, 1), (paid, 2)]))[1] == "held"

    # when
    assert (await confirm(scripts, keys, rid, [timed, paid]))[:2] == [0, "confirmed"]

    # then
    assert [(c.held, c.sold) for c in [await counters(redis, keys, s) for s in (timed, paid)]] == [(0, 1), (0, 2)]
    assert await user_units(redis, keys, paid) == {"bob": 2}
    types = [
        (e["type"], e["sku"], e["held"], e["sold"]) for e in await events(redis, keys, keys.shard_of(TENANT, paid))
    ]
    assert types[-2:] == [("confirmed", timed, "0", "1"), ("sold", paid, "0", "2")]
    assert (await part(redis, keys, rid, timed))["cf"] == "h"


async def test_held_part_past_its_deadline_is_confirmed_from_the_hold(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given all stock held by a hold whose deadline passed, not yet swept
    await set_sku(scripts, keys, "late", 2, ttl=1)
    rid = new_id(keys, "late")
    await reserve(scripts, keys, rid, "cy", [("late", 2)])

    # when paid long after the deadline
    reply = await confirm(scripts, keys, rid, ["late"], now=NOW + 3_600_000)

    # then the held units are sold (no stock check, no double deduction)
    assert reply[:2] == [0, "confirmed"]
    state = await counters(redis, keys, "late")
    assert (state.held, state.sold) == (0, 2)
    state.check_invariant()
    assert await expiry_index(redis, keys, keys.shard_of(TENANT, "late")) == {}


async def test_pending_part_is_deducted_directly(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "song", 3, mode="on_payment", limit=4)
    rid = new_id(keys, "song")
    assert await reserve(scripts, keys, rid, "dee", [("song", 3)]) == [0, "pending", 0, 0, 0]

    assert (await confirm(scripts, keys, rid, ["song"]))[:2] == [0, "confirmed"]

    state = await counters(redis, keys, "song")
    assert (state.held, state.sold, state.available) == (0, 3, 0)
    assert await user_units(redis, keys, "song") == {"dee": 3}
    stored = await part(redis, keys, rid, "song")
    assert (stored["st"], stored["pst"], stored["cf"]) == ("confirmed", "pending", "d")
    last = (await events_of(redis, keys, "song"))[-1]
    assert (last["type"], last["qty"], last["held"], last["sold"], last["res"]) == ("sold", "3", "0", "3", rid)


async def test_expired_part_is_deducted_directly_without_a_new_hold(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given an expired hold
    await set_sku(scripts, keys, "bag", 4, ttl=1)
    rid = new_id(keys, "bag")
    shard = keys.shard_of(TENANT, "bag")
    await reserve(scripts, keys, rid, "eli", [("bag", 2)])
    assert await expire_holds(scripts, keys, shard, [(rid, ["bag"])], now=FAR_FUTURE) == [1, 0]

    # when paid after expiry
    assert (await confirm(scripts, keys, rid, ["bag"], now=FAR_FUTURE))[:2] == [0, "confirmed"]

    # then
    state = await counters(redis, keys, "bag")
    assert (state.held, state.sold) == (0, 2)
    assert await user_units(redis, keys, "bag") == {"eli": 2}
    stored = await part(redis, keys, rid, "bag")
    assert (stored["st"], stored["pst"], stored["cf"]) == ("confirmed", "expired", "d")
    assert await expiry_index(redis, keys, shard) == {}
    assert (await events_of(redis, keys, "bag"))[-1]["type"] == "sold"


async def test_already_confirmed_changes_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "hat", 5)
    rid = new_id(keys, "hat")
    await reserve(scripts, keys, rid, "fox", [("hat", 1)])
    await confirm(scripts, keys, rid, ["hat"])
    before = await snapshot(redis)

    assert (await confirm(scripts, keys, rid, ["hat"], now=NOW + 1))[:2] == [1, "confirmed"]

    assert await snapshot(redis) == before


async def test_reservation_not_found_when_no_part_exists(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "sock", 5)
    before = await snapshot(redis)

    assert await confirm(scripts, keys, new_id(keys, "sock"), ["sock"]) == [-5]

    assert await snapshot(redis) == before


async def test_reservation_not_found_when_a_named_sku_is_not_a_line(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    line, stranger = skus_on_one_shard(keys, "stale", 2)
    await set_sku(scripts, keys, line, 5)
    await set_sku(scripts, keys, stranger, 5)
    rid = new_id(keys, line)
    await reserve(scripts, keys, rid, "gil", [(line, 1)])
    before = await snapshot(redis)

    assert await confirm(scripts, keys, rid, [stranger]) == [-5]
    assert await confirm(scripts, keys, rid, [line, stranger]) == [-5]

    assert await snapshot(redis) == before


async def test_reservation_not_found_when_lines_are_missing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a part of two held lines
    first, second = skus_on_one_shard(keys, "subset", 2)
    await set_sku(scripts, keys, first, 5)
    await set_sku(scripts, keys, second, 5)
    rid = new_id(keys, first)
    await reserve(scripts, keys, rid, "hank", [(first, 1), (second, 2)])
    before = await snapshot(redis)

    # when the caller names only one of them ("the lines do not match")
    reply = await confirm(scripts, keys, rid, [first])

    # then it is refused; confirming anyway would strand `second`'s 2 held units for good (a confirmed
    # part can neither be released nor expired)
    assert reply == [-5]
    assert await snapshot(redis) == before


async def test_released_part_is_refused(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "belt", 5)
    rid = new_id(keys, "belt")
    await reserve(scripts, keys, rid, "ian", [("belt", 1)])
    await release(scripts, keys, rid, ["belt"])
    before = await snapshot(redis)

    assert await confirm(scripts, keys, rid, ["belt"]) == [-6]

    assert await snapshot(redis) == before


async def test_limit_exceeded_on_a_direct_deduction(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given two pending parts of 2 for a limit of 2 (pending holds nothing, so both were accepted)
    plain, capped = skus_on_one_shard(keys, "cap", 2)
    await set_sku(scripts, keys, plain, 10, mode="on_payment")
    await set_sku(scripts, keys, capped, 10, mode="on_payment", limit=2)
    first, second = new_id(keys, plain), new_id(keys, plain)
    await reserve(scripts, keys, first, "jo", [(capped, 2)])
    await reserve(scripts, keys, second, "jo", [(plain, 1), (capped, 2)])
    assert (await confirm(scripts, keys, first, [capped]))[:2] == [0, "confirmed"]
    before = await snapshot(redis)

    # when the second is paid
    reply = await confirm(scripts, keys, second, [plain, capped])

    # then line 2 is refused: the user has 2 of 2
    assert reply == [-3, 2, 2, 2]
    assert await snapshot(redis) == before


async def test_limit_exceeded_on_an_expired_part_bought_around(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "vinyl", 10, ttl=1, limit=2)
    shard = keys.shard_of(TENANT, "vinyl")
    lapsed, bought = new_id(keys, "vinyl"), new_id(keys, "vinyl")
    await reserve(scripts, keys, lapsed, "kai", [("vinyl", 2)])
    await expire_holds(scripts, keys, shard, [(lapsed, ["vinyl"])], now=FAR_FUTURE)
    await reserve(scripts, keys, bought, "kai", [("vinyl", 1)], now=FAR_FUTURE)
    before = await snapshot(redis)

    assert await confirm(scripts, keys, lapsed, ["vinyl"], now=FAR_FUTURE) == [-3, 1, 2, 1]

    assert await snapshot(redis) == before


async def test_insufficient_stock_lists_every_short_direct_line(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a pending part of (a: 2, b: 3, c: 1) after another buyer paid 1 a and 2 b
    a, b, c = skus_on_one_shard(keys, "pay", 3)
    await set_sku(scripts, keys, a, 2, mode="on_payment")
    await set_sku(scripts, keys, b, 4, mode="on_payment", safety=1)
    await set_sku(scripts, keys, c, 1, mode="on_payment")
    late, early = new_id(keys, a), new_id(keys, a)
    await reserve(scripts, keys, late, "lou", [(a, 2), (b, 3), (c, 1)])
    await reserve(scripts, keys, early, "mia", [(a, 1), (b, 2)])
    assert (await confirm(scripts, keys, early, [a, b]))[:2] == [0, "confirmed"]
    before = await snapshot(redis)

    # when
    reply = await confirm(scripts, keys, late, [a, b, c])

    # then
    assert reply == [-2, 1, 1, 1, 2, 1, 1]  # (line, available to it, available to anyone)
    assert await snapshot(redis) == before


async def test_insufficient_stock_after_expiry_when_the_units_were_taken(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await set_sku(scripts, keys, "seat", 1, ttl=1)
    shard = keys.shard_of(TENANT, "seat")
    rid = new_id(keys, "seat")
    await reserve(scripts, keys, rid, "ned", [("seat", 1)])
    await expire_holds(scripts, keys, shard, [(rid, ["seat"])], now=FAR_FUTURE)
    await reserve(scripts, keys, new_id(keys, "seat"), "oli", [("seat", 1)], now=FAR_FUTURE)
    before = await snapshot(redis)

    assert await confirm(scripts, keys, rid, ["seat"], now=FAR_FUTURE) == [-2, 1, 0, 0]

    assert await snapshot(redis) == before
    assert (await part(redis, keys, rid, "seat"))["st"] == "expired"


async def test_many_payers_for_few_units_sell_exactly_the_stock(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given 200 pending one-unit reservations for 25 sellable units
    await set_sku(scripts, keys, "drop", 30, safety=5, mode="on_payment")
    ids = [new_id(keys, "drop") for _ in range(200)]
    for i, rid in enumerate(ids):
        assert (await reserve(scripts, keys, rid, f"p{i}", [("drop", 1)]))[1] == "pending"

    # when all pay at once
    replies = await asyncio.gather(*(confirm(scripts, keys, rid, ["drop"]) for rid in ids))

    # then
    assert Counter(r[0] for r in replies) == {0: 25, -2: 175}
    assert all(r == [-2, 1, 0, 0] for r in replies if r[0] != 0)
    state = await counters(redis, keys, "drop")
    assert (state.held, state.sold) == (0, 25)
    state.check_invariant()
    winners = {rid for rid, r in zip(ids, replies, strict=True) if r[0] == 0}
    assert {e["res"] for e in await events_of(redis, keys, "drop") if e["type"] == "sold"} == winners
    assert sum((await user_units(redis, keys, "drop")).values()) == 25
    await assert_ledger_matches(redis, keys, "drop")


async def test_concurrent_confirms_of_one_reservation_sell_once(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    a, b = skus_on_one_shard(keys, "once", 2)
    await set_sku(scripts, keys, a, 10)
    await set_sku(scripts, keys, b, 10, mode="on_payment")
    rid = new_id(keys, a)
    await reserve(scripts, keys, rid, "pat", [(a, 3), (b, 4)])

    replies = await asyncio.gather(*(confirm(scripts, keys, rid, [a, b]) for _ in range(100)))

    assert sorted(r[:2] for r in replies) == [[0, "confirmed"]] + [[1, "confirmed"]] * 99
    assert [(c.held, c.sold) for c in [await counters(redis, keys, s) for s in (a, b)]] == [(0, 3), (0, 4)]
    kinds = Counter(e["type"] for e in await events(redis, keys, keys.shard_of(TENANT, a)) if e["res"] == rid)
    assert kinds == {"held": 1, "pending": 1, "confirmed": 1, "sold": 1}


async def test_confirms_racing_the_sweeper_sell_every_unit_once(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given 40 one-unit holds, all past their deadline, holding all the stock
    await set_sku(scripts, keys, "race", 40, ttl=1)
    shard = keys.shard_of(TENANT, "race")
    ids = [new_id(keys, "race") for _ in range(40)]
    for i, rid in enumerate(ids):
        await reserve(scripts, keys, rid, f"r{i}", [("race", 1)])

    # when every buyer pays while three sweepers expire the same due holds
    sweeps = [expire_holds(scripts, keys, shard, [(rid, ["race"]) for rid in ids], now=FAR_FUTURE) for _ in range(3)]
    paid, swept = await race([confirm(scripts, keys, rid, ["race"], now=FAR_FUTURE) for rid in ids], sweeps)

    # then each unit is sold exactly once: from its hold, or directly after it expired
    assert [r[:2] for r in paid] == [[0, "confirmed"]] * 40
    expired = sum(r[0] for r in swept)
    how = Counter([(await part(redis, keys, rid, "race"))["cf"] for rid in ids])
    assert how["d"] == expired
    assert how["h"] == 40 - expired
    state = await counters(redis, keys, "race")
    assert (state.held, state.sold) == (0, 40)
    assert await expiry_index(redis, keys, shard) == {}
    await assert_ledger_matches(redis, keys, "race")
