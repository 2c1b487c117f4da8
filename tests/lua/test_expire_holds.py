"""expire_holds.lua called directly: expiring due holds, leaving not-due ones, dropping stale index entries,
batches, and several sweepers (and buyers) racing on the same holds."""

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
    set_sku,
    skus_on_one_shard,
    user_units,
)


async def test_due_hold_is_expired_and_its_units_return(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a hold of 3 (ttl 60 s) and another user's hold
    await set_sku(scripts, keys, "cake", 10, ttl=60)
    shard = keys.shard_of(TENANT, "cake")
    rid, other = new_id(keys, "cake"), new_id(keys, "cake")
    await reserve(scripts, keys, rid, "ann", [("cake", 3)])
    await reserve(scripts, keys, other, "bob", [("cake", 1)], now=NOW + 30_000)
    deadline = NOW + 60_000

    # when swept exactly at its deadline
    reply = await expire_holds(scripts, keys, shard, [(rid, ["cake"])], now=deadline)

    # then
    assert reply == [1, 0]
    state = await counters(redis, keys, "cake")
    assert (state.held, state.sold, state.available) == (1, 0, 9)
    assert await user_units(redis, keys, "cake") == {"bob": 1}
    assert (await part(redis, keys, rid, "cake"))["st"] == "expired"
    assert await expiry_index(redis, keys, shard) == {other: NOW + 90_000}
    assert (await events(redis, keys, shard))[-1] == {
        "type": "expired",
        "tenant": TENANT,
        "sku": "cake",
        "qty": "3",
        "res": rid,
        "user": "ann",
        "on_hand": "10",
        "held": "1",
        "sold": "0",
        "bo": "0",
        "av0": "6",
        "av": "9",
        "at": str(deadline),
        "lbo": "0",
        "st": "expired",
    }


async def test_held_lines_return_and_on_payment_lines_lapse(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    timed, ordered, paid = skus_on_one_shard(keys, "exp", 3)
    shard = keys.shard_of(TENANT, timed)
    await set_sku(scripts, keys, timed, 5, ttl=1)
    await set_sku(scripts, keys, ordered, 5, mode="on_order")
    await set_sku(scripts, keys, paid, 5, mode="on_payment")
    rid = new_id(keys, timed)
    await reserve(scripts, keys, rid, "cy", [(timed, 1), (ordered, 2), (paid, 3)])
    ledger_before = len(await events(redis, keys, shard))

    assert await expire_holds(scripts, keys, shard, [(rid, [timed, ordered, paid])], now=FAR_FUTURE) == [1, 0]

    assert [(await counters(redis, keys, s)).held for s in (timed, ordered, paid)] == [0, 0, 0]
    assert [await user_units(redis, keys, s) for s in (timed, ordered, paid)] == [{}, {}, {}]
    ledger = await events(redis, keys, shard)
    assert [(e["type"], e["sku"], e["qty"]) for e in ledger[ledger_before:]] == [
        ("expired", timed, "1"),
        ("expired", ordered, "2"),
        ("lapsed", paid, "3"),  # held nothing: no counter moves, but the ledger sees the line lapse
    ]


async def test_hold_not_yet_due_is_left_in_the_index(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "pie", 10, ttl=60)
    shard = keys.shard_of(TENANT, "pie")
    rid = new_id(keys, "pie")
    await reserve(scripts, keys, rid, "dee", [("pie", 2)])
    before = await snapshot(redis)

    # one millisecond before the deadline
    assert await expire_holds(scripts, keys, shard, [(rid, ["pie"])], now=NOW + 59_999) == [0, 1]

    assert await snapshot(redis) == before
    assert await expiry_index(redis, keys, shard) == {rid: NOW + 60_000}


async def test_hold_without_deadline_is_never_expired(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "bed", 10, mode="on_order")
    shard = keys.shard_of(TENANT, "bed")
    rid = new_id(keys, "bed")
    await reserve(scripts, keys, rid, "eli", [("bed", 2)])
    await redis.zadd(keys.expiry(shard), {rid: 1})  # a stray index entry for it
    before = await snapshot(redis)

    assert await expire_holds(scripts, keys, shard, [(rid, ["bed"])], now=FAR_FUTURE) == [0, 1]

    assert await snapshot(redis) == before


async def test_index_entry_of_a_missing_part_is_dropped(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "jam", 10)
    shard = keys.shard_of(TENANT, "jam")
    ghost = new_id(keys, "jam")
    await redis.zadd(keys.expiry(shard), {ghost: NOW})
    before = await snapshot(redis)

    assert await expire_holds(scripts, keys, shard, [(ghost, [])], now=FAR_FUTURE) == [0, 1]

    after = await snapshot(redis)
    assert keys.expiry(shard) not in after
    assert after == {k: v for k, v in before.items() if k != keys.expiry(shard)}


async def test_parts_confirmed_or_released_since_the_read_are_left_alone(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given two due holds that a sweeper read, then a confirm and a release that beat it
    await set_sku(scripts, keys, "tart", 10, ttl=1)
    shard = keys.shard_of(TENANT, "tart")
    paid, dropped = new_id(keys, "tart"), new_id(keys, "tart")
    await reserve(scripts, keys, paid, "fay", [("tart", 2)])
    await reserve(scripts, keys, dropped, "gus", [("tart", 3)])
    due = await redis.zrangebyscore(keys.expiry(shard), "-inf", FAR_FUTURE)
    assert sorted(due) == sorted([paid, dropped])
    await confirm(scripts, keys, paid, ["tart"], now=FAR_FUTURE)
    await release(scripts, keys, dropped, ["tart"], now=FAR_FUTURE)
    # (their index entries are back, as if re-added by a slow writer, to see them dropped)
    await redis.zadd(keys.expiry(shard), {paid: NOW + 1_000, dropped: NOW + 1_000})
    before = await snapshot(redis)

    # when
    reply = await expire_holds(scripts, keys, shard, [(paid, ["tart"]), (dropped, ["tart"])], now=FAR_FUTURE)

    # then nothing is returned twice; only the index entries go
    assert reply == [0, 2]
    state = await counters(redis, keys, "tart")
    assert (state.held, state.sold) == (0, 2)
    after = await snapshot(redis)
    assert keys.expiry(shard) not in after
    assert after == {k: v for k, v in before.items() if k != keys.expiry(shard)}


async def test_batch_of_several_reservations_with_several_lines(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given on one shard: two due holds (one of two lines), one not due, one already released, one missing
    a, b = skus_on_one_shard(keys, "batch", 2)
    shard = keys.shard_of(TENANT, a)
    await set_sku(scripts, keys, a, 20, ttl=10)
    await set_sku(scripts, keys, b, 20, ttl=10)
    due_one, due_two, later, gone = (new_id(keys, a) for _ in range(4))
    await reserve(scripts, keys, due_one, "u1", [(a, 1), (b, 2)])
    await reserve(scripts, keys, due_two, "u2", [(b, 3)])
    await reserve(scripts, keys, later, "u3", [(a, 4)], now=NOW + 60_000)
    await reserve(scripts, keys, gone, "u4", [(a, 5)])
    await release(scripts, keys, gone, [a])
    batch = [(due_one, [a, b]), (later, [a]), (gone, [a]), (due_two, [b])]

    # when swept after the first deadlines, before the last
    reply = await expire_holds(scripts, keys, shard, batch, now=NOW + 10_000)

    # then
    assert reply == [2, 2]
    assert (await counters(redis, keys, a)).held == 4
    assert (await counters(redis, keys, b)).held == 0
    assert await user_units(redis, keys, a) == {"u3": 4}
    assert await user_units(redis, keys, b) == {}
    statuses = [(await part(redis, keys, rid, a))["st"] for rid in (due_one, due_two, later, gone)]
    assert statuses == ["expired", "expired", "held", "released"]
    assert await expiry_index(redis, keys, shard) == {later: NOW + 70_000}
    expired = [(e["res"], e["sku"], e["qty"]) for e in await events(redis, keys, shard) if e["type"] == "expired"]
    assert expired == [(due_one, a, "1"), (due_one, b, "2"), (due_two, b, "3")]


async def test_concurrent_sweepers_expire_each_hold_exactly_once(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given 60 due two-line holds on one shard
    a, b = skus_on_one_shard(keys, "sweep", 2)
    shard = keys.shard_of(TENANT, a)
    await set_sku(scripts, keys, a, 100, ttl=1)
    await set_sku(scripts, keys, b, 200, ttl=1)
    ids = [new_id(keys, a) for _ in range(60)]
    for i, rid in enumerate(ids):
        assert (await reserve(scripts, keys, rid, f"u{i % 7}", [(a, 1), (b, 2)]))[0] == 0

    # when 20 sweepers race over overlapping batches of the same holds
    batches = [[(rid, [a, b]) for rid in ids[start : start + 30]] for start in range(0, 40, 2)]
    replies = await asyncio.gather(*(expire_holds(scripts, keys, shard, batch, now=FAR_FUTURE) for batch in batches))

    # then every hold was expired once and only once
    assert sum(r[0] for r in replies) == 60
    assert sum(r[0] + r[1] for r in replies) == sum(len(batch) for batch in batches)
    assert [(await counters(redis, keys, s)).held for s in (a, b)] == [0, 0]
    assert await user_units(redis, keys, a) == {}
    assert await user_units(redis, keys, b) == {}
    assert await expiry_index(redis, keys, shard) == {}
    expired = Counter(e["res"] for e in await events(redis, keys, shard) if e["type"] == "expired")
    assert expired == dict.fromkeys(ids, 2)
    for sku in (a, b):
        await assert_ledger_matches(redis, keys, sku)


async def test_sweeps_racing_releases_and_reserves_keep_exact_totals(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given 50 due one-unit holds selling out the SKU
    await set_sku(scripts, keys, "mix", 50, ttl=1)
    shard = keys.shard_of(TENANT, "mix")
    ids = [new_id(keys, "mix") for _ in range(50)]
    for i, rid in enumerate(ids):
        await reserve(scripts, keys, rid, f"h{i}", [("mix", 1)])
    newcomers = [new_id(keys, "mix") for _ in range(80)]

    # when sweepers, cancelling holders and newcomers race
    sweeps, releases, reserves = await race(
        [expire_holds(scripts, keys, shard, [(rid, ["mix"]) for rid in ids], now=FAR_FUTURE) for _ in range(3)],
        [release(scripts, keys, rid, ["mix"], now=FAR_FUTURE) for rid in ids[:25]],
        [reserve(scripts, keys, rid, f"n{i}", [("mix", 1)], now=FAR_FUTURE) for i, rid in enumerate(newcomers)],
    )

    # then every old hold ended exactly once (expired or released), and newcomers got only freed units
    expired = sum(r[0] for r in sweeps)
    released = sum(1 for r in releases if r == [0, "released"])
    assert all(r in ([0, "released"], [1, "expired"]) for r in releases)
    assert expired + released == 50
    granted = sum(1 for r in reserves if r[0] == 0)
    state = await counters(redis, keys, "mix")
    assert state.held == granted
    state.check_invariant()
    statuses = Counter([(await part(redis, keys, rid, "mix"))["st"] for rid in ids])
    assert statuses == Counter(expired=expired, released=released)
    assert set(await expiry_index(redis, keys, shard)) == {
        rid for rid, r in zip(newcomers, reserves, strict=True) if r[0] == 0
    }
    await assert_ledger_matches(redis, keys, "mix")


async def test_a_pending_part_with_a_deadline_expires_and_one_without_stays(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given two pending parts (on_payment lines only): one of a cross-shard reservation that has a
    # deadline (the caller passed it), one of a reservation with no deadline at all
    await set_sku(scripts, keys, "voucher", 5, mode="on_payment")
    shard = keys.shard_of(TENANT, "voucher")
    with_deadline, without = new_id(keys, "voucher"), new_id(keys, "voucher")
    assert await reserve(scripts, keys, with_deadline, "di", [("voucher", 1)], deadline=NOW + 1_000) == [
        0,
        "pending",
        NOW + 1_000,
        0,
        0,
    ]
    assert await reserve(scripts, keys, without, "di", [("voucher", 1)]) == [0, "pending", 0, 0, 0]
    assert await expiry_index(redis, keys, shard) == {with_deadline: NOW + 1_000}

    # when
    reply = await expire_holds(scripts, keys, shard, [(with_deadline, ["voucher"])], now=FAR_FUTURE)

    # then the first is expired (nothing to return), the second still pending, counters untouched
    assert reply == [1, 0]
    assert (await part(redis, keys, with_deadline, "voucher"))["st"] == "expired"
    assert (await part(redis, keys, without, "voucher"))["st"] == "pending"
    assert (await counters(redis, keys, "voucher")).held == 0
    assert (await events(redis, keys, shard))[-1]["type"] == "lapsed"
