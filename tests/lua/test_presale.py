"""Presale / backorder in the scripts (issue 6): once stock on hand is gone, holds take units on backorder up
to the presale's cap; a receipt books goods into on_hand and fills the backorders oldest first; every way a
line stops holding (release, expiry, undo, a reverted direct sale) gives its backordered units back."""

from __future__ import annotations

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.scripts import Scripts
from tests.helpers import snapshot
from tests.lua.support import (
    NOW,
    TENANT,
    adjust,
    assert_ledger_matches,
    backorder_queue,
    confirm,
    counters,
    events_of,
    expire_holds,
    new_id,
    part,
    race,
    receive,
    release,
    reserve,
    revert_confirm,
    set_sku,
)

ETA = NOW + 14 * 86_400_000  # two weeks out


async def presale_sku(scripts: Scripts, keys: KeySpace, sku: str, on_hand: int, cap: int, *, ends: int = 0) -> None:
    reply = await set_sku(scripts, keys, sku, on_hand, presale=(cap, ETA, ends))
    assert reply[0] == 1, reply


async def test_a_hold_takes_on_hand_first_then_backorder(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given 2 on hand and a presale of 3
    await presale_sku(scripts, keys, "wine", 2, 3)
    rid = new_id(keys, "wine")

    # when a buyer asks for 4
    reply = await reserve(scripts, keys, rid, "ann", [("wine", 4)])

    # then 2 come from stock on hand, 2 on backorder with the presale's ETA
    assert reply == [0, "held", NOW + 900_000, 2, ETA]
    state = await counters(redis, keys, "wine")
    assert (state.held, state.backordered, state.available) == (4, 2, 1)
    state.check_invariant()
    assert (await part(redis, keys, rid, "wine"))["b:wine"] == "2"
    assert await backorder_queue(redis, keys, "wine") == [rid]
    held = (await events_of(redis, keys, "wine"))[-1]
    assert (held["type"], held["lbo"], held["bo"], held["av0"], held["av"]) == ("held", "2", "2", "5", "1")
    await assert_ledger_matches(redis, keys, "wine")


async def test_a_line_on_hand_covers_takes_nothing_on_backorder(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await presale_sku(scripts, keys, "cork", 5, 3)
    rid = new_id(keys, "cork")

    assert await reserve(scripts, keys, rid, "ann", [("cork", 5)]) == [0, "held", NOW + 900_000, 0, 0]

    assert (await counters(redis, keys, "cork")).backordered == 0
    assert "b:cork" not in await part(redis, keys, rid, "cork")
    assert await backorder_queue(redis, keys, "cork") == []


async def test_past_the_cap_is_insufficient_stock_and_changes_nothing(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given 1 on hand and a presale of 2, 2 of the 3 taken
    await presale_sku(scripts, keys, "vine", 1, 2)
    assert (await reserve(scripts, keys, new_id(keys, "vine"), "ann", [("vine", 2)]))[0] == 0
    before = await snapshot(redis)

    # when someone asks for 2
    reply = await reserve(scripts, keys, new_id(keys, "vine"), "bob", [("vine", 2)])

    # then 1 is available (on backorder), and nothing changed
    assert reply == [-2, 1, 1, 1]
    assert await snapshot(redis) == before


async def test_the_cap_is_reached_exactly_under_contention(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given 5 on hand and a presale of 10
    await presale_sku(scripts, keys, "drop", 5, 10)

    # when 100 buyers race for 1 each
    ids = [new_id(keys, "drop") for _ in range(100)]
    [replies] = await race([reserve(scripts, keys, rid, f"u{i}", [("drop", 1)]) for i, rid in enumerate(ids)])

    # then exactly 15 win: 5 from stock on hand, then 10 on backorder, queued in the order they won
    winners = [rid for rid, r in zip(ids, replies, strict=True) if r[0] == 0]
    assert len(winners) == 15
    assert all(r == [-2, 1, 0, 0] for r in replies if r[0] != 0)
    on_backorder = [rid for rid, r in zip(ids, replies, strict=True) if r[0] == 0 and r[3] == 1]
    assert len(on_backorder) == 10
    state = await counters(redis, keys, "drop")
    assert (state.held, state.backordered, state.available) == (15, 10, 0)
    state.check_invariant()
    assert sorted(await backorder_queue(redis, keys, "drop")) == sorted(on_backorder)


async def test_after_ends_at_no_new_backorder_is_granted(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a presale of 5 ending at NOW + 1000, with 2 units on hand
    await presale_sku(scripts, keys, "late", 2, 5, ends=NOW + 1_000)
    early = new_id(keys, "late")
    assert (await reserve(scripts, keys, early, "ann", [("late", 3)], now=NOW + 999))[3] == 1

    # when someone asks at the very end, and after it
    at_end = await reserve(scripts, keys, new_id(keys, "late"), "bob", [("late", 1)], now=NOW + 1_000)
    after = await reserve(scripts, keys, new_id(keys, "late"), "cat", [("late", 1)], now=NOW + 5_000)

    # then nothing is available (on hand is gone, the presale ended); the backorder granted before stays
    assert at_end == [-2, 1, 0, 0] and after == [-2, 1, 0, 0]
    assert (await counters(redis, keys, "late")).backordered == 1


async def test_release_expiry_and_undo_give_backordered_units_back(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given no stock on hand and a presale of 9, three holds of 3 on backorder
    await presale_sku(scripts, keys, "pre", 0, 9)
    released, expired, undone = (new_id(keys, "pre") for _ in range(3))
    for i, rid in enumerate((released, expired, undone)):
        assert (await reserve(scripts, keys, rid, f"u{i}", [("pre", 3)], deadline=NOW + i + 1))[3] == 3
    assert (await counters(redis, keys, "pre")).available == 0

    # when one is released, one expires, one is undone (compensation)
    assert (await release(scripts, keys, released, ["pre"]))[0] == 0
    assert await expire_holds(scripts, keys, keys.shard_of(TENANT, "pre"), [(expired, ["pre"])], now=NOW + 2) == [1, 0]
    assert (await release(scripts, keys, undone, ["pre"], how="undo"))[0] == 0

    # then every unit is back on sale on backorder, the queue is empty, and each event says so
    state = await counters(redis, keys, "pre")
    assert (state.held, state.backordered, state.available) == (0, 0, 9)
    assert await backorder_queue(redis, keys, "pre") == []
    assert "b:pre" not in await part(redis, keys, released, "pre")
    last = (await events_of(redis, keys, "pre"))[-3:]
    assert [(e["type"], e["bo"], e["lbo"], e["av"]) for e in last] == [
        ("released", "6", "0", "3"),
        ("expired", "3", "0", "6"),
        ("undone", "0", "0", "9"),
    ]
    await assert_ledger_matches(redis, keys, "pre")


async def test_a_sold_backorder_stays_backordered_until_received(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await presale_sku(scripts, keys, "book", 1, 5)
    rid = new_id(keys, "book")
    assert (await reserve(scripts, keys, rid, "ann", [("book", 3)]))[3] == 2

    assert (await confirm(scripts, keys, rid, ["book"]))[:2] == [0, "confirmed"]

    state = await counters(redis, keys, "book")
    assert (state.held, state.sold, state.backordered) == (0, 3, 2)
    assert await backorder_queue(redis, keys, "book") == [rid]
    confirmed = (await events_of(redis, keys, "book"))[-1]
    assert (confirmed["type"], confirmed["lbo"], confirmed["bo"]) == ("confirmed", "2", "2")


async def test_paying_after_expiry_takes_backorder_and_a_revert_gives_it_back(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given a hold of 2 that expired while another buyer took the one unit on hand
    await presale_sku(scripts, keys, "late-pay", 1, 4)
    lapsed, other = new_id(keys, "late-pay"), new_id(keys, "late-pay")
    assert (await reserve(scripts, keys, lapsed, "ann", [("late-pay", 2)], deadline=NOW + 1))[3] == 1
    shard = keys.shard_of(TENANT, "late-pay")
    assert await expire_holds(scripts, keys, shard, [(lapsed, ["late-pay"])], now=NOW + 2) == [1, 0]
    assert (await reserve(scripts, keys, other, "bob", [("late-pay", 1)]))[3] == 0

    # when ann pays: a direct deduction, all of it on backorder now
    assert (await confirm(scripts, keys, lapsed, ["late-pay"]))[:2] == [0, "confirmed"]
    state = await counters(redis, keys, "late-pay")
    assert (state.held, state.sold, state.backordered) == (1, 2, 2)
    assert (await part(redis, keys, lapsed, "late-pay"))["b:late-pay"] == "2"
    assert await backorder_queue(redis, keys, "late-pay") == [lapsed]

    # and the confirm is reverted (compensation): the units and the backorder go back
    assert await revert_confirm(scripts, keys, lapsed, ["late-pay"]) == [0, "expired"]
    state = await counters(redis, keys, "late-pay")
    assert (state.held, state.sold, state.backordered) == (1, 0, 0)
    assert await backorder_queue(redis, keys, "late-pay") == []
    await assert_ledger_matches(redis, keys, "late-pay")


async def test_a_receipt_fills_backorders_oldest_first(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given three backorders of 2, 3 and 1 units, taken in that order (and one sold)
    await presale_sku(scripts, keys, "ship", 0, 10)
    first, second, third = (new_id(keys, "ship") for _ in range(3))
    for t, (rid, qty) in enumerate(((first, 2), (second, 3), (third, 1))):
        assert (await reserve(scripts, keys, rid, f"u{t}", [("ship", qty)], now=NOW + t))[3] == qty
    assert (await confirm(scripts, keys, second, ["ship"]))[0] == 0

    # when 4 units arrive
    reply = await receive(scripts, keys, "ship", 4, [first, second], now=NOW + 10)

    # then the first line is filled whole, the second in part, the third not at all
    assert reply[1] == 4 and reply[-2:] == [4, 2]  # on_hand 4; 4 units filled over 2 lines
    state = await counters(redis, keys, "ship")
    assert (state.on_hand, state.held, state.sold, state.backordered, state.available) == (4, 3, 3, 2, 8)
    state.check_invariant()
    assert "b:ship" not in await part(redis, keys, first, "ship")
    assert (await part(redis, keys, second, "ship"))["b:ship"] == "1"
    assert (await part(redis, keys, third, "ship"))["b:ship"] == "1"
    assert await backorder_queue(redis, keys, "ship") == [second, third]
    received, *filled = (await events_of(redis, keys, "ship"))[-3:]
    assert (received["type"], received["qty"], received["on_hand"], received["av0"], received["av"]) == (
        "received",
        "4",
        "4",
        "4",
        "8",
    )
    assert [(e["type"], e["res"], e["qty"], e["lbo"], e["bo"], e["st"]) for e in filled] == [
        ("filled", first, "2", "0", "4", "held"),
        ("filled", second, "2", "1", "2", "confirmed"),
    ]
    assert (filled[1]["pst"], filled[1]["cf"]) == ("held", "h")  # a confirmed line keeps how it was confirmed
    await assert_ledger_matches(redis, keys, "ship")


async def test_a_receipt_beyond_the_backorders_leaves_the_rest_on_hand(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await presale_sku(scripts, keys, "more", 0, 5)
    rid = new_id(keys, "more")
    assert (await reserve(scripts, keys, rid, "ann", [("more", 2)]))[3] == 2

    reply = await receive(scripts, keys, "more", 10, [rid])

    assert reply[-2:] == [2, 1]
    state = await counters(redis, keys, "more")
    assert (state.on_hand, state.held, state.backordered, state.available) == (10, 2, 0, 13)  # 8 on hand, 5 presale
    assert await backorder_queue(redis, keys, "more") == []


async def test_a_receipt_naming_a_stale_head_changes_nothing(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given two backorders, the caller having read only the second as the head
    await presale_sku(scripts, keys, "stale", 0, 5)
    first, second = new_id(keys, "stale"), new_id(keys, "stale")
    assert (await reserve(scripts, keys, first, "ann", [("stale", 1)], now=NOW))[3] == 1
    assert (await reserve(scripts, keys, second, "bob", [("stale", 1)], now=NOW + 1))[3] == 1
    before = await snapshot(redis)

    # when the receipt names a wrong head, or too few lines to cover what it fills
    wrong = await receive(scripts, keys, "stale", 1, [second])
    short = await receive(scripts, keys, "stale", 2, [first])

    # then STALE, and nothing changed
    assert wrong == [-14, 1] and short == [-14, 2]
    assert await snapshot(redis) == before


async def test_a_receipt_of_an_unknown_sku_is_not_found(scripts: Scripts, keys: KeySpace) -> None:
    assert await receive(scripts, keys, "nothing", 1, []) == [-1]


async def test_a_cap_below_what_is_backordered_is_a_conflict(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given 3 units backordered under a cap of 5
    await presale_sku(scripts, keys, "cap", 0, 5)
    assert (await reserve(scripts, keys, new_id(keys, "cap"), "ann", [("cap", 3)]))[3] == 3
    before = await snapshot(redis)

    # when the cap is lowered below 3, or the presale removed
    lowered = await set_sku(scripts, keys, "cap", 0, presale=(2, ETA, 0))
    removed = await set_sku(scripts, keys, "cap", 0)

    # then both are refused and nothing changed; down to exactly 3 is fine
    assert lowered == [-4, 3, 0, 3, "presale_cap"] and removed == [-4, 3, 0, 3, "presale_cap"]
    assert await snapshot(redis) == before
    assert (await set_sku(scripts, keys, "cap", 0, presale=(3, ETA, 0)))[0] == 0


async def test_on_hand_may_shrink_to_what_is_promised_from_it(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given 2 on hand, held 4 of which 2 on backorder: 2 promised from stock on hand
    await presale_sku(scripts, keys, "shrink", 2, 5)
    assert (await reserve(scripts, keys, new_id(keys, "shrink"), "ann", [("shrink", 4)]))[3] == 2

    # then on_hand may not go below 2, neither by PUT nor by a shrink, but to 2 is fine
    assert await set_sku(scripts, keys, "shrink", 1, presale=(5, ETA, 0)) == [-4, 4, 0, 2, "on_hand"]
    assert await adjust(scripts, keys, "shrink", -1) == [-4, 4, 0, 2, "on_hand"]
    assert (await adjust(scripts, keys, "shrink", 1))[0] == 0
    assert (await adjust(scripts, keys, "shrink", -1))[0] == 0
    (await counters(redis, keys, "shrink")).check_invariant()


async def test_receipts_racing_reserves_and_releases_keep_the_invariant(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given 10 backorders of 1
    await presale_sku(scripts, keys, "race", 0, 20)
    queued = [new_id(keys, "race") for _ in range(10)]
    for i, rid in enumerate(queued):
        assert (await reserve(scripts, keys, rid, f"q{i}", [("race", 1)], now=NOW + i))[3] == 1

    # when receipts (each naming the head it read), new reservations and releases interleave
    head = await backorder_queue(redis, keys, "race")
    fresh = [new_id(keys, "race") for _ in range(10)]
    receipts, reserves, releases = await race(
        [receive(scripts, keys, "race", 3, head[:3]), receive(scripts, keys, "race", 3, head[:3])],
        [reserve(scripts, keys, rid, f"n{i}", [("race", 2)], now=NOW + 100) for i, rid in enumerate(fresh)],
        [release(scripts, keys, rid, ["race"]) for rid in queued[5:]],
    )

    # then whatever won, the counters obey the invariant and agree with the lines
    assert all(r[0] in (0, -14) for r in receipts) and all(r[0] == 0 for r in releases)
    assert all(r[0] in (0, -2) for r in reserves)
    state = await counters(redis, keys, "race")
    state.check_invariant()
    lines = [await part(redis, keys, rid, "race") for rid in queued + fresh]
    live = [p for p in lines if p.get("st") == "held"]
    assert state.held == sum(int(p["q:race"]) for p in live)
    assert state.backordered == sum(int(p.get("b:race", 0)) for p in live)
    assert sorted(await backorder_queue(redis, keys, "race")) == sorted(
        rid for rid, p in zip(queued + fresh, lines, strict=True) if p.get("st") == "held" and "b:race" in p
    )
