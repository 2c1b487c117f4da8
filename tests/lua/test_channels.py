"""Sales channels in the scripts (issue 6): ring-fenced quotas taken first, borrowing from the shared pool,
priorities deciding whose fence holds when stock is short, quotas given back by releases and expiries, and
no channel ever taking from another's quota."""

from __future__ import annotations

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.scripts import Scripts
from tests.helpers import snapshot
from tests.lua.support import (
    NOW,
    TENANT,
    adjust,
    channel_used,
    confirm,
    counters,
    events_of,
    expire_holds,
    new_id,
    part,
    race,
    release,
    reserve,
    revert_confirm,
    set_channel,
    set_sku,
)


async def test_a_channel_takes_from_its_quota_first(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given 10 on hand, 4 of them fenced for the web shop
    await set_sku(scripts, keys, "tea", 10)
    assert await set_channel(scripts, keys, "tea", "web", 4) == [1, 4, 0, 0, 1]
    web = new_id(keys, "tea")

    # when the web shop holds 3
    assert (await reserve(scripts, keys, web, "ann", [("tea", 3)], channel="web"))[0] == 0

    # then they came from its quota: 1 still fenced, 6 shared
    assert await channel_used(redis, keys, "tea", "web") == 3
    stored = await part(redis, keys, web, "tea")
    assert (stored["ch"], stored["c:tea"]) == ("web", "3")
    held = (await events_of(redis, keys, "tea"))[-1]
    assert (held["lq"], held["av0"], held["av"]) == ("3", "10", "7")
    # a reservation naming no channel may take the 6 shared, not the web shop's last fenced unit
    refused = await reserve(scripts, keys, new_id(keys, "tea"), "bob", [("tea", 7)])
    assert refused == [-2, 1, 6, 7]  # 6 for it, 7 for anyone (the web shop's fence included)
    assert (await reserve(scripts, keys, new_id(keys, "tea"), "bob", [("tea", 6)]))[0] == 0
    assert (await reserve(scripts, keys, new_id(keys, "tea"), "web2", [("tea", 1)], channel="web"))[0] == 0
    assert (await counters(redis, keys, "tea")).available == 0


async def test_a_channel_without_a_quota_on_the_sku_takes_from_the_shared_pool(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await set_sku(scripts, keys, "cup", 5)
    await set_channel(scripts, keys, "cup", "web", 3)

    reply = await reserve(scripts, keys, new_id(keys, "cup"), "ann", [("cup", 3)], channel="market")

    assert reply == [-2, 1, 2, 5]
    assert (await reserve(scripts, keys, new_id(keys, "cup"), "ann", [("cup", 2)], channel="market"))[0] == 0
    assert await channel_used(redis, keys, "cup", "web") == 0


async def test_a_borrowing_channel_goes_on_past_its_quota_and_one_that_may_not_stops(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given 10 on hand: 3 fenced for the web shop (borrows), 3 for the app (does not)
    await set_sku(scripts, keys, "pen", 10)
    await set_channel(scripts, keys, "pen", "web", 3)
    await set_channel(scripts, keys, "pen", "app", 3, borrow=False)

    # then the web shop may take 7 (3 + the 4 shared), the app 3 only
    assert await reserve(scripts, keys, new_id(keys, "pen"), "x", [("pen", 8)], channel="web") == [-2, 1, 7, 10]
    assert await reserve(scripts, keys, new_id(keys, "pen"), "x", [("pen", 4)], channel="app") == [-2, 1, 3, 10]
    web = new_id(keys, "pen")
    assert (await reserve(scripts, keys, web, "ann", [("pen", 5)], channel="web"))[0] == 0
    assert (await part(redis, keys, web, "pen"))["c:pen"] == "3"  # 3 from the quota, 2 borrowed
    assert await channel_used(redis, keys, "pen", "web") == 3
    assert (await reserve(scripts, keys, new_id(keys, "pen"), "bob", [("pen", 3)], channel="app"))[0] == 0
    state = await counters(redis, keys, "pen")
    assert (state.held, state.available) == (8, 2)
    assert await reserve(scripts, keys, new_id(keys, "pen"), "cat", [("pen", 1)], channel="app") == [-2, 1, 0, 2]


async def test_when_stock_is_short_the_higher_priority_keeps_its_fence(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given quotas of 4 (web, priority 10) and 4 (app, priority 1) on 10 units, then stock shrinks to 5
    await set_sku(scripts, keys, "mug", 10)
    await set_channel(scripts, keys, "mug", "web", 4, priority=10, borrow=False)
    await set_channel(scripts, keys, "mug", "app", 4, priority=1, borrow=False)
    assert (await adjust(scripts, keys, "mug", -5))[0] == 0

    # then the web shop's 4 are fenced, the app keeps the 1 left, and nothing is shared
    assert await reserve(scripts, keys, new_id(keys, "mug"), "x", [("mug", 5)], channel="web") == [-2, 1, 4, 5]
    assert await reserve(scripts, keys, new_id(keys, "mug"), "x", [("mug", 2)], channel="app") == [-2, 1, 1, 5]
    assert await reserve(scripts, keys, new_id(keys, "mug"), "x", [("mug", 1)]) == [-2, 1, 0, 5]


async def test_release_expiry_and_undo_give_quota_units_back(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "bag", 10)
    await set_channel(scripts, keys, "bag", "web", 6)
    released, expired, undone = (new_id(keys, "bag") for _ in range(3))
    for i, rid in enumerate((released, expired, undone)):
        reply = await reserve(scripts, keys, rid, f"u{i}", [("bag", 2)], channel="web", deadline=NOW + i + 1)
        assert reply[0] == 0
    assert await channel_used(redis, keys, "bag", "web") == 6

    assert (await release(scripts, keys, released, ["bag"]))[0] == 0
    assert await expire_holds(scripts, keys, keys.shard_of(TENANT, "bag"), [(expired, ["bag"])], now=NOW + 2) == [1, 0]
    assert (await release(scripts, keys, undone, ["bag"], how="undo"))[0] == 0

    assert await channel_used(redis, keys, "bag", "web") == 0
    assert "c:bag" not in await part(redis, keys, released, "bag")
    assert (await counters(redis, keys, "bag")).held == 0


async def test_a_sale_keeps_its_quota_units_and_a_late_payment_takes_them_again(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given a web hold of 2 from the quota that is paid, and another that lapsed
    await set_sku(scripts, keys, "hat", 10)
    await set_channel(scripts, keys, "hat", "web", 4, borrow=False)
    paid, late = new_id(keys, "hat"), new_id(keys, "hat")
    assert (await reserve(scripts, keys, paid, "ann", [("hat", 2)], channel="web"))[0] == 0
    assert (await confirm(scripts, keys, paid, ["hat"]))[:2] == [0, "confirmed"]
    assert (await reserve(scripts, keys, late, "bob", [("hat", 2)], channel="web", deadline=NOW + 1))[0] == 0
    assert await expire_holds(scripts, keys, keys.shard_of(TENANT, "hat"), [(late, ["hat"])], now=NOW + 2) == [1, 0]
    assert await channel_used(redis, keys, "hat", "web") == 2  # the sale still counts

    # when the lapsed hold is paid: a direct deduction from the channel's quota again
    assert (await confirm(scripts, keys, late, ["hat"]))[:2] == [0, "confirmed"]
    assert await channel_used(redis, keys, "hat", "web") == 4
    sold = (await events_of(redis, keys, "hat"))[-1]
    assert (sold["type"], sold["lq"]) == ("sold", "2")

    # and reverting that confirm gives them back
    assert (await revert_confirm(scripts, keys, late, ["hat"]))[0] == 0
    assert await channel_used(redis, keys, "hat", "web") == 2


async def test_a_quota_below_what_is_used_is_a_conflict(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "box", 10)
    await set_channel(scripts, keys, "box", "web", 5)
    assert (await reserve(scripts, keys, new_id(keys, "box"), "ann", [("box", 3)], channel="web"))[0] == 0
    before = await snapshot(redis)

    assert await set_channel(scripts, keys, "box", "web", 2) == [-4, 3]
    assert await snapshot(redis) == before
    assert await set_channel(scripts, keys, "box", "web", 3, priority=5, borrow=False) == [0, 3, 3, 5, 0]
    last = (await events_of(redis, keys, "box"))[-1]
    assert (last["type"], last["channel"], last["quota"], last["priority"], last["borrow"]) == (
        "channel_set",
        "web",
        "3",
        "5",
        "0",
    )


async def test_a_sku_has_a_bounded_number_of_channels(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    await set_sku(scripts, keys, "many", 10)
    for c in ("a", "b"):
        assert (await set_channel(scripts, keys, "many", c, 1, max_channels=2))[0] == 1
    assert await set_channel(scripts, keys, "many", "c", 1, max_channels=2) == [-15, 2]
    assert (await set_channel(scripts, keys, "many", "b", 2, max_channels=2))[0] == 0  # an update is fine
    assert await set_channel(scripts, keys, "nothing", "a", 1) == [-1]


async def test_channels_racing_never_break_a_quota(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given 30 on hand: web 10 (borrows), app 8 (does not), market 5 (borrows), 7 shared
    await set_sku(scripts, keys, "drop", 30)
    await set_channel(scripts, keys, "drop", "web", 10)
    await set_channel(scripts, keys, "drop", "app", 8, borrow=False)
    await set_channel(scripts, keys, "drop", "market", 5)
    names = ["web", "app", "market", ""]

    # when 200 buyers on four routes race for 1 or 2 units each
    calls = [
        reserve(scripts, keys, new_id(keys, "drop"), f"u{i}", [("drop", 1 + i % 2)], channel=names[i % 4])
        for i in range(200)
    ]
    [replies] = await race(calls)

    # then every unit went, none twice, and no channel took more than its quota
    state = await counters(redis, keys, "drop")
    state.check_invariant()
    assert state.held == 30 and sum(1 + i % 2 for i, r in enumerate(replies) if r[0] == 0) == 30
    for channel, quota in (("web", 10), ("app", 8), ("market", 5)):
        assert await channel_used(redis, keys, "drop", channel) <= quota
    # the app cannot borrow: every unit it held came from its quota
    app_units = sum(1 + i % 2 for i, r in enumerate(replies) if r[0] == 0 and names[i % 4] == "app")
    assert app_units == await channel_used(redis, keys, "drop", "app")
