"""reserve.lua called directly: holds per mode, deadlines, ALREADY, SKU_NOT_FOUND, LIMIT_EXCEEDED and
INSUFFICIENT_STOCK (all-or-nothing), and races on one SKU / one reservation id."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.scripts import Scripts
from tests.helpers import snapshot
from tests.lua.support import (
    NOW,
    TENANT,
    assert_ledger_matches,
    counters,
    events,
    events_of,
    expiry_index,
    new_id,
    part,
    release,
    reserve,
    set_sku,
    skus_on_one_shard,
    user_units,
)


async def test_pre_reserve_line_is_held_until_now_plus_ttl(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given
    await set_sku(scripts, keys, "ticket", 10, ttl=120)
    rid = new_id(keys, "ticket")
    shard = keys.shard_of(TENANT, "ticket")
    deadline = NOW + 120_000

    # when
    reply = await reserve(scripts, keys, rid, "ann", [("ticket", 3)], doc='{"user_id":"ann"}')

    # then
    assert reply == [0, "held", deadline, 0, 0]  # line 1: nothing on backorder
    state = await counters(redis, keys, "ticket")
    assert (state.on_hand, state.held, state.sold) == (10, 3, 0)
    assert await user_units(redis, keys, "ticket") == {"ann": 3}
    assert await part(redis, keys, rid, "ticket") == {
        "st": "held",
        "u": "ann",
        "t": TENANT,
        "exp": str(deadline),
        "c": str(NOW),
        "n": "1",
        "q:ticket": "3",
        "h:ticket": "1",
        "doc": '{"user_id":"ann"}',
    }
    assert await expiry_index(redis, keys, shard) == {rid: deadline}
    assert (await events(redis, keys, shard))[-1] == {
        "type": "held",
        "tenant": TENANT,
        "sku": "ticket",
        "qty": "3",
        "res": rid,
        "user": "ann",
        "on_hand": "10",
        "held": "3",
        "sold": "0",
        "bo": "0",
        "av0": "10",
        "av": "7",
        "at": str(NOW),
        "lbo": "0",
        "lq": "0",
        "exp": str(deadline),
        "st": "held",
        "doc": '{"user_id":"ann"}',  # the home part's first line carries the document
    }


async def test_mixed_modes_shortest_pre_reserve_ttl_sets_the_deadline(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given four SKUs on one shard: two pre_reserve ttls, one on_order (short ttl, ignored), one on_payment
    slow, fast, ordered, paid = skus_on_one_shard(keys, "mix", 4)
    shard = keys.shard_of(TENANT, slow)
    await set_sku(scripts, keys, slow, 5, ttl=600)
    await set_sku(scripts, keys, fast, 5, ttl=300)
    await set_sku(scripts, keys, ordered, 5, mode="on_order", ttl=1)
    await set_sku(scripts, keys, paid, 5, mode="on_payment", ttl=1)
    rid = new_id(keys, slow)
    lines = [(slow, 1), (fast, 2), (ordered, 3), (paid, 4)]

    # when
    reply = await reserve(scripts, keys, rid, "bob", lines)

    # then
    assert reply == [0, "held", NOW + 300_000, *[0, 0] * 4]
    assert [(await counters(redis, keys, sku)).held for sku, _ in lines] == [1, 2, 3, 0]
    assert [await user_units(redis, keys, sku) for sku, _ in lines] == [{"bob": 1}, {"bob": 2}, {"bob": 3}, {}]
    stored = await part(redis, keys, rid, slow)
    assert [(stored[f"q:{sku}"], stored[f"h:{sku}"]) for sku, _ in lines] == [
        ("1", "1"),
        ("2", "1"),
        ("3", "1"),
        ("4", "0"),
    ]
    assert "doc" not in stored  # '' doc: not the home part
    assert await expiry_index(redis, keys, shard) == {rid: NOW + 300_000}
    line_events = [(e["type"], e["sku"], e["qty"], e["held"]) for e in await events(redis, keys, shard)][-4:]
    assert line_events == [
        ("held", slow, "1", "1"),
        ("held", fast, "2", "2"),
        ("held", ordered, "3", "3"),
        ("pending", paid, "4", "0"),
    ]


async def test_on_order_only_is_held_without_deadline(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "sofa", 4, mode="on_order", ttl=5)
    rid = new_id(keys, "sofa")

    reply = await reserve(scripts, keys, rid, "cat", [("sofa", 2)])

    assert reply == [0, "held", 0, 0, 0]
    assert (await counters(redis, keys, "sofa")).held == 2
    assert (await part(redis, keys, rid, "sofa"))["exp"] == "0"
    assert await expiry_index(redis, keys, keys.shard_of(TENANT, "sofa")) == {}


async def test_on_payment_only_is_pending_and_holds_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "ebook", 4, mode="on_payment", limit=5)
    rid = new_id(keys, "ebook")

    reply = await reserve(scripts, keys, rid, "dan", [("ebook", 4)])

    assert reply == [0, "pending", 0, 0, 0]
    state = await counters(redis, keys, "ebook")
    assert (state.held, state.sold, state.available) == (0, 0, 4)
    assert await user_units(redis, keys, "ebook") == {}
    stored = await part(redis, keys, rid, "ebook")
    assert (stored["st"], stored["exp"], stored["h:ebook"]) == ("pending", "0", "0")
    assert await expiry_index(redis, keys, keys.shard_of(TENANT, "ebook")) == {}
    last = (await events_of(redis, keys, "ebook"))[-1]
    assert (last["type"], last["qty"], last["held"], last["res"]) == ("pending", "4", "0", rid)


async def test_shared_deadline_takes_the_earlier_of_it_and_the_parts_own(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given a pre_reserve SKU (own deadline NOW + 900 s) and an on_order one (no deadline of its own)
    await set_sku(scripts, keys, "scarf", 10, ttl=900)
    await set_sku(scripts, keys, "hat", 10, mode="on_order")
    earlier, later, zero, on_order = (new_id(keys, "scarf") for _ in range(4))

    # when a reservation spanning shards passes its shared deadline
    replies = [
        await reserve(scripts, keys, earlier, "eve", [("scarf", 1)], deadline=NOW + 5_000),
        await reserve(scripts, keys, later, "eve", [("scarf", 1)], deadline=NOW + 2_000_000),
        # 0: the caller read the SKU while it was on_order; it is pre_reserve now and keeps its own
        await reserve(scripts, keys, zero, "eve", [("scarf", 1)], deadline=0),
        await reserve(scripts, keys, on_order, "eve", [("hat", 1)], deadline=NOW + 5_000),
    ]

    # then every pre_reserve hold has a deadline, the earlier one wins, and an on_order part follows
    # the reservation's deadline so its parts expire together
    assert replies == [
        [0, "held", NOW + 5_000, 0, 0],
        [0, "held", NOW + 900_000, 0, 0],
        [0, "held", NOW + 900_000, 0, 0],
        [0, "held", NOW + 5_000, 0, 0],
    ]
    scarf_index = await expiry_index(redis, keys, keys.shard_of(TENANT, "scarf"))
    assert {rid: scarf_index[rid] for rid in (earlier, later, zero)} == {
        earlier: NOW + 5_000,
        later: NOW + 900_000,
        zero: NOW + 900_000,
    }
    assert (await expiry_index(redis, keys, keys.shard_of(TENANT, "hat")))[on_order] == NOW + 5_000


async def test_already_when_the_part_exists_changes_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a held part
    await set_sku(scripts, keys, "pen", 10, ttl=60)
    rid = new_id(keys, "pen")
    assert await reserve(scripts, keys, rid, "fay", [("pen", 2)]) == [0, "held", NOW + 60_000, 0, 0]
    before = await snapshot(redis)

    # when it is re-run (a retry), even with other lines, user and time
    again = await reserve(scripts, keys, rid, "fay", [("pen", 2)])
    other = await reserve(scripts, keys, rid, "gus", [("pen", 9)], now=NOW + 1)

    # then
    assert again == [1, "held", NOW + 60_000]
    assert other == [1, "held", NOW + 60_000]
    assert await snapshot(redis) == before


async def test_already_reports_the_current_status(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "ink", 10, ttl=60)
    rid = new_id(keys, "ink")
    await reserve(scripts, keys, rid, "fay", [("ink", 2)])
    assert await release(scripts, keys, rid, ["ink"]) == [0, "released"]
    before = await snapshot(redis)

    assert await reserve(scripts, keys, rid, "fay", [("ink", 2)]) == [1, "released", NOW + 60_000]

    assert await snapshot(redis) == before
    assert (await counters(redis, keys, "ink")).held == 0


async def test_duplicate_line_is_refused_and_changes_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given one unit with a limit of one: two lines of the same SKU must not both pass their checks
    await set_sku(scripts, keys, "dup", 1, limit=1)
    before = await snapshot(redis)

    # when
    reply = await reserve(scripts, keys, new_id(keys, "dup"), "ann", [("dup", 1), ("dup", 1)])

    # then
    assert reply == [-9, 2]
    assert await snapshot(redis) == before


async def test_sku_not_found_names_the_line_and_changes_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given line 1 exists, line 2 does not, line 3 would be short
    first, missing, third = skus_on_one_shard(keys, "nf", 3)
    await set_sku(scripts, keys, first, 5)
    await set_sku(scripts, keys, third, 1)
    before = await snapshot(redis)

    # when
    reply = await reserve(scripts, keys, new_id(keys, first), "hal", [(first, 1), (missing, 1), (third, 2)])

    # then
    assert reply == [-1, 2]
    assert await snapshot(redis) == before


async def test_limit_exceeded_reports_limit_and_units_and_changes_nothing(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given the user already holds 2 of a limit of 3 on line 2's SKU
    free, limited = skus_on_one_shard(keys, "lim", 2)
    await set_sku(scripts, keys, free, 10)
    await set_sku(scripts, keys, limited, 10, limit=3)
    await reserve(scripts, keys, new_id(keys, limited), "ivy", [(limited, 2)])
    before = await snapshot(redis)

    # when the user asks 2 more
    reply = await reserve(scripts, keys, new_id(keys, free), "ivy", [(free, 1), (limited, 2)])

    # then
    assert reply == [-3, 2, 3, 2]
    assert await snapshot(redis) == before


async def test_limit_allows_exactly_the_limit_and_counts_per_user(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await set_sku(scripts, keys, "cap", 10, limit=3)
    await reserve(scripts, keys, new_id(keys, "cap"), "joe", [("cap", 2)])

    assert (await reserve(scripts, keys, new_id(keys, "cap"), "joe", [("cap", 1)]))[0] == 0
    assert (await reserve(scripts, keys, new_id(keys, "cap"), "kim", [("cap", 3)]))[0] == 0
    assert await reserve(scripts, keys, new_id(keys, "cap"), "kim", [("cap", 1)]) == [-3, 1, 3, 3]

    assert await user_units(redis, keys, "cap") == {"joe": 3, "kim": 3}


async def test_limit_is_checked_on_on_payment_lines_too(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "pay-cap", 10, mode="on_payment", limit=2)
    before = await snapshot(redis)

    assert await reserve(scripts, keys, new_id(keys, "pay-cap"), "lea", [("pay-cap", 3)]) == [-3, 1, 2, 0]

    assert await snapshot(redis) == before


async def test_limit_error_wins_over_insufficient_stock(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    short, limited = skus_on_one_shard(keys, "both", 2)
    await set_sku(scripts, keys, short, 1)
    await set_sku(scripts, keys, limited, 10, limit=1)
    before = await snapshot(redis)

    assert await reserve(scripts, keys, new_id(keys, short), "max", [(short, 5), (limited, 2)]) == [-3, 2, 1, 0]

    assert await snapshot(redis) == before


async def test_insufficient_stock_lists_every_short_line_and_changes_nothing(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given line 1 short (safety counts), line 2 fine, line 3 short (held counts), line 4 short (on_payment)
    a, b, c, d = skus_on_one_shard(keys, "short", 4)
    await set_sku(scripts, keys, a, 10, safety=3)
    await set_sku(scripts, keys, b, 10)
    await set_sku(scripts, keys, c, 10)
    await set_sku(scripts, keys, d, 2, mode="on_payment")
    await reserve(scripts, keys, new_id(keys, c), "other", [(c, 9)])
    before = await snapshot(redis)

    # when
    reply = await reserve(scripts, keys, new_id(keys, a), "ned", [(a, 8), (b, 10), (c, 2), (d, 3)])

    # then
    assert reply == [-2, 1, 7, 7, 3, 1, 1, 4, 2, 2]  # (line, available to it, available to anyone)
    assert await snapshot(redis) == before


async def test_available_is_zero_not_negative_when_safety_is_eaten_by_a_shrink(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # on_hand 5, safety 5: nothing to sell
    await set_sku(scripts, keys, "floor", 5, safety=5)

    assert await reserve(scripts, keys, new_id(keys, "floor"), "ola", [("floor", 1)]) == [-2, 1, 0, 0]


async def test_2000_concurrent_single_units_hold_exactly_the_sellable_stock(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given 60 on hand, 10 of them safety stock
    await set_sku(scripts, keys, "drop", 60, safety=10)

    # when 2,000 buyers race for one unit each
    replies = await asyncio.gather(
        *(reserve(scripts, keys, new_id(keys, "drop"), f"b{i}", [("drop", 1)]) for i in range(2000))
    )

    # then
    assert Counter(r[0] for r in replies) == {0: 50, -2: 1950}
    assert all(r == [-2, 1, 0, 0] for r in replies if r[0] == -2)
    state = await counters(redis, keys, "drop")
    assert (state.held, state.sold, state.available) == (50, 0, 0)
    state.check_invariant()
    assert len(await user_units(redis, keys, "drop")) == 50
    assert len(await expiry_index(redis, keys, keys.shard_of(TENANT, "drop"))) == 50
    await assert_ledger_matches(redis, keys, "drop")


async def test_concurrent_random_quantities_never_exceed_stock(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "bulk", 100, safety=7)
    rng = random.Random(3)
    quantities = [rng.randint(1, 5) for _ in range(300)]

    replies = await asyncio.gather(
        *(reserve(scripts, keys, new_id(keys, "bulk"), f"b{i}", [("bulk", q)]) for i, q in enumerate(quantities))
    )

    granted = sum(q for q, r in zip(quantities, replies, strict=True) if r[0] == 0)
    state = await counters(redis, keys, "bulk")
    assert state.held == granted
    assert 93 - 4 <= granted <= 93  # demand is 9x supply: at most 4 units (a refused 5) can be left
    state.check_invariant()
    # every refusal told the truth about what was left at that moment
    assert all(r[0] == -2 and r[2] < q for q, r in zip(quantities, replies, strict=True) if r[0] != 0)
    await assert_ledger_matches(redis, keys, "bulk")


async def test_one_user_racing_gets_exactly_the_limit(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "limited", 1000, limit=3)

    replies = await asyncio.gather(
        *(reserve(scripts, keys, new_id(keys, "limited"), "scalper", [("limited", 1)]) for _ in range(100))
    )

    assert Counter(r[0] for r in replies) == {0: 3, -3: 97}
    assert all(r == [-3, 1, 3, 3] for r in replies if r[0] == -3)
    assert (await counters(redis, keys, "limited")).held == 3
    assert await user_units(redis, keys, "limited") == {"scalper": 3}


async def test_concurrent_retries_of_one_id_reserve_once(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "retry", 10, ttl=60)
    rid = new_id(keys, "retry")

    replies = await asyncio.gather(*(reserve(scripts, keys, rid, "pia", [("retry", 4)]) for _ in range(100)))

    assert sorted(replies) == [[0, "held", NOW + 60_000, 0, 0]] + [[1, "held", NOW + 60_000]] * 99
    assert (await counters(redis, keys, "retry")).held == 4
    assert await user_units(redis, keys, "retry") == {"pia": 4}
    assert [e["type"] for e in await events_of(redis, keys, "retry")] == ["sku_set", "held"]


async def test_concurrent_multi_line_reserves_are_all_or_nothing(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given two SKUs on one shard; the second is the bottleneck
    plenty, scarce = skus_on_one_shard(keys, "pair", 2)
    await set_sku(scripts, keys, plenty, 100)
    await set_sku(scripts, keys, scarce, 7)

    # when 200 two-line reservations race
    replies = await asyncio.gather(
        *(reserve(scripts, keys, new_id(keys, plenty), f"q{i}", [(plenty, 2), (scarce, 1)]) for i in range(200))
    )

    # then no reservation got one line without the other
    assert Counter(r[0] for r in replies) == {0: 7, -2: 193}
    assert all(r == [-2, 2, 0, 0] for r in replies if r[0] == -2)
    assert (await counters(redis, keys, plenty)).held == 14
    assert (await counters(redis, keys, scarce)).held == 7
    for sku in (plenty, scarce):
        (await counters(redis, keys, sku)).check_invariant()
        await assert_ledger_matches(redis, keys, sku)
