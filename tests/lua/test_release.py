"""release.lua called directly: release and undo (compensation), ALREADY for released / expired parts,
RESERVATION_NOT_FOUND and RESERVATION_CONFIRMED, and races."""

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


def _without_streams(state: dict[str, object], keys: KeySpace, shard: int) -> dict[str, object]:
    return {k: v for k, v in state.items() if k != keys.events(shard)}


async def test_release_gives_held_units_back(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a hold of 3 and another user's hold of 1
    await set_sku(scripts, keys, "book", 10, limit=5)
    shard = keys.shard_of(TENANT, "book")
    rid, other = new_id(keys, "book"), new_id(keys, "book")
    await reserve(scripts, keys, rid, "ann", [("book", 3)])
    await reserve(scripts, keys, other, "bob", [("book", 1)])

    # when
    reply = await release(scripts, keys, rid, ["book"], now=NOW + 5)

    # then
    assert reply == [0, "released"]
    state = await counters(redis, keys, "book")
    assert (state.held, state.sold, state.available) == (1, 0, 9)
    assert await user_units(redis, keys, "book") == {"bob": 1}  # ann's field is gone, not 0
    assert (await part(redis, keys, rid, "book"))["st"] == "released"
    assert await expiry_index(redis, keys, shard) == {other: NOW + 900_000}
    assert (await events(redis, keys, shard))[-1] == {
        "type": "released",
        "tenant": TENANT,
        "sku": "book",
        "qty": "3",
        "res": rid,
        "user": "ann",
        "on_hand": "10",
        "held": "1",
        "sold": "0",
        "bo": "0",
        "av0": "6",
        "av": "9",
        "at": str(NOW + 5),
        "lbo": "0",
        "st": "released",
    }


async def test_release_returns_only_held_lines_and_logs_every_line(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    timed, paid = skus_on_one_shard(keys, "rel", 2)
    await set_sku(scripts, keys, timed, 5)
    await set_sku(scripts, keys, paid, 5, mode="on_payment")
    rid = new_id(keys, timed)
    await reserve(scripts, keys, rid, "cy", [(timed, 2), (paid, 3)])

    assert await release(scripts, keys, rid, [timed, paid]) == [0, "released"]

    assert [(await counters(redis, keys, s)).held for s in (timed, paid)] == [0, 0]
    line_events = [
        (e["type"], e["sku"], e["qty"], e["held"]) for e in await events(redis, keys, keys.shard_of(TENANT, paid))
    ]
    # the held line's units moved back ('released'); the on_payment line held nothing ('cancelled')
    assert line_events[-2:] == [("released", timed, "2", "0"), ("cancelled", paid, "3", "0")]


async def test_release_of_a_pending_part_marks_it_released(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "file", 5, mode="on_payment")
    rid = new_id(keys, "file")
    await reserve(scripts, keys, rid, "dee", [("file", 2)])
    before = await counters(redis, keys, "file")

    assert await release(scripts, keys, rid, ["file"]) == [0, "released"]

    assert await counters(redis, keys, "file") == before
    assert (await part(redis, keys, rid, "file"))["st"] == "released"
    # a released pending part can no longer be paid
    assert await confirm(scripts, keys, rid, ["file"]) == [-6]


async def test_undo_leaves_the_shard_exactly_as_before_the_reserve(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given the same user already holds units of both SKUs, and another user too
    a, b, c = skus_on_one_shard(keys, "undo", 3)
    shard = keys.shard_of(TENANT, a)
    await set_sku(scripts, keys, a, 10, limit=6)
    await set_sku(scripts, keys, b, 10, mode="on_order")
    await set_sku(scripts, keys, c, 10, mode="on_payment")
    await reserve(scripts, keys, new_id(keys, a), "eve", [(a, 1), (b, 2)])
    await reserve(scripts, keys, new_id(keys, a), "fay", [(a, 1)])
    before = await snapshot(redis)
    ledger_before = len(await events(redis, keys, shard))
    rid = new_id(keys, a)
    assert (await reserve(scripts, keys, rid, "eve", [(a, 3), (b, 1), (c, 2)], doc="{}"))[0] == 0

    # when a later shard refused and this part is compensated
    reply = await release(scripts, keys, rid, [a, b, c], how="undo", now=NOW + 1)

    # then counters, per-user units, expiry index and the part are exactly as before; the ledger says why
    assert reply == [0, "undone"]
    assert _without_streams(await snapshot(redis), keys, shard) == _without_streams(before, keys, shard)
    ledger = await events(redis, keys, shard)
    assert len(ledger) == ledger_before + 6
    assert [(e["type"], e["sku"], e["qty"], e["res"]) for e in ledger[-3:]] == [
        ("undone", a, "3", rid),
        ("undone", b, "1", rid),
        ("cancelled", c, "2", rid),  # c's line held nothing (on_payment)
    ]


async def test_undo_of_a_part_with_a_fresh_user_removes_every_trace(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await set_sku(scripts, keys, "clean", 10)
    shard = keys.shard_of(TENANT, "clean")
    before = await snapshot(redis)
    rid = new_id(keys, "clean")
    await reserve(scripts, keys, rid, "gus", [("clean", 4)])

    assert await release(scripts, keys, rid, ["clean"], how="undo") == [0, "undone"]

    after = await snapshot(redis)
    assert _without_streams(after, keys, shard) == _without_streams(before, keys, shard)
    assert keys.user_counts(shard, TENANT, "clean") not in after
    assert keys.expiry(shard) not in after
    assert keys.reservation(shard, rid) not in after


async def test_already_released_changes_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "pot", 5)
    rid = new_id(keys, "pot")
    await reserve(scripts, keys, rid, "hal", [("pot", 2)])
    await release(scripts, keys, rid, ["pot"])
    before = await snapshot(redis)

    assert await release(scripts, keys, rid, ["pot"], now=NOW + 1) == [1, "released"]

    assert await snapshot(redis) == before


async def test_already_expired_changes_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "pan", 5, ttl=1)
    shard = keys.shard_of(TENANT, "pan")
    rid = new_id(keys, "pan")
    await reserve(scripts, keys, rid, "ivy", [("pan", 2)])
    await expire_holds(scripts, keys, shard, [(rid, ["pan"])], now=FAR_FUTURE)
    before = await snapshot(redis)

    assert await release(scripts, keys, rid, ["pan"], now=FAR_FUTURE) == [1, "expired"]

    assert await snapshot(redis) == before
    assert (await counters(redis, keys, "pan")).held == 0


async def test_reservation_not_found_when_no_part_exists(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "lid", 5)
    before = await snapshot(redis)

    assert await release(scripts, keys, new_id(keys, "lid"), ["lid"]) == [-5]
    assert await release(scripts, keys, new_id(keys, "lid"), ["lid"], how="undo") == [-5]

    assert await snapshot(redis) == before


async def test_reservation_not_found_when_a_named_sku_is_not_a_line(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    line, stranger = skus_on_one_shard(keys, "nl", 2)
    await set_sku(scripts, keys, line, 5)
    await set_sku(scripts, keys, stranger, 5)
    rid = new_id(keys, line)
    await reserve(scripts, keys, rid, "jon", [(line, 1)])
    before = await snapshot(redis)

    assert await release(scripts, keys, rid, [line, stranger]) == [-5]

    assert await snapshot(redis) == before


async def test_reservation_not_found_when_lines_are_missing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a part of two held lines
    first, second = skus_on_one_shard(keys, "part", 2)
    await set_sku(scripts, keys, first, 5)
    await set_sku(scripts, keys, second, 5)
    rid = new_id(keys, first)
    await reserve(scripts, keys, rid, "kim", [(first, 1), (second, 2)])
    before = await snapshot(redis)

    # when the caller's view misses a line
    reply = await release(scripts, keys, rid, [first])

    # then it is refused: releasing anyway marks the part released and `second`'s 2 held units are never
    # returned (a second release answers ALREADY, the sweeper drops the part from its index)
    assert reply == [-5]
    assert await snapshot(redis) == before


async def test_confirmed_part_is_refused_for_release_and_undo(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "cap", 5)
    rid = new_id(keys, "cap")
    await reserve(scripts, keys, rid, "lou", [("cap", 2)])
    await confirm(scripts, keys, rid, ["cap"])
    before = await snapshot(redis)

    assert await release(scripts, keys, rid, ["cap"]) == [-7]
    assert await release(scripts, keys, rid, ["cap"], how="undo") == [-7]

    assert await snapshot(redis) == before


async def test_concurrent_releases_of_one_reservation_return_units_once(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    a, b = skus_on_one_shard(keys, "twice", 2)
    await set_sku(scripts, keys, a, 10)
    await set_sku(scripts, keys, b, 10)
    await reserve(scripts, keys, new_id(keys, a), "other", [(a, 1), (b, 1)])
    rid = new_id(keys, a)
    await reserve(scripts, keys, rid, "mo", [(a, 3), (b, 2)])

    replies = await asyncio.gather(*(release(scripts, keys, rid, [a, b]) for _ in range(100)))

    assert sorted(replies) == [[0, "released"]] + [[1, "released"]] * 99
    assert [(await counters(redis, keys, s)).held for s in (a, b)] == [1, 1]
    assert await user_units(redis, keys, a) == {"other": 1}
    kinds = Counter(e["type"] for e in await events(redis, keys, keys.shard_of(TENANT, a)) if e["res"] == rid)
    assert kinds == {"held": 2, "released": 2}


async def test_releases_racing_reserves_hand_units_over_exactly(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given all 30 units held by 30 one-unit holds
    await set_sku(scripts, keys, "swap", 30)
    holders = [new_id(keys, "swap") for _ in range(30)]
    for i, rid in enumerate(holders):
        await reserve(scripts, keys, rid, f"h{i}", [("swap", 1)])

    # when 20 holders release while 100 newcomers try to reserve
    newcomers = [new_id(keys, "swap") for _ in range(100)]
    released, reserved = await race(
        [release(scripts, keys, rid, ["swap"]) for rid in holders[:20]],
        [reserve(scripts, keys, rid, f"n{i}", [("swap", 1)]) for i, rid in enumerate(newcomers)],
    )

    # then every released unit went to at most one newcomer
    assert released == [[0, "released"]] * 20
    granted = sum(1 for r in reserved if r[0] == 0)
    assert all(r[0] == 0 or r == [-2, 1, 0, 0] for r in reserved)
    assert 0 <= granted <= 20
    state = await counters(redis, keys, "swap")
    assert state.held == 30 - 20 + granted
    state.check_invariant()
    assert sum((await user_units(redis, keys, "swap")).values()) == state.held
    assert len(await expiry_index(redis, keys, keys.shard_of(TENANT, "swap"))) == state.held
    await assert_ledger_matches(redis, keys, "swap")
