"""set_sku-3.lua called directly: create, update, STOCK_CONFLICT, idempotent replay and IDEMPOTENCY_CONFLICT."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.stock.policy import POLICY_FIELDS
from app.store.scripts import Scripts
from tests.helpers import snapshot
from tests.lua.support import (
    IDEM_TTL,
    NO_POLICY,
    NO_PRESALE_STATE,
    NOW,
    TENANT,
    adjust,
    assert_ledger_matches,
    confirm,
    counters,
    counters_of,
    events,
    events_of,
    idem_key,
    new_id,
    race,
    reserve,
    set_sku,
    sku_hash,
)

# max_per_order, min_account_age_days, min_orders, min_member_days, cooldown after/within/minutes
POLICY = (2, 30, 1, 7, 3, 60, 30)
POLICY_FIELDS_SET = {name: str(value) for name, value in zip(POLICY_FIELDS, POLICY, strict=True)}


async def test_creates_a_sku_with_its_settings_and_one_event(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # when
    eta = NOW + 86_400_000
    reply = await set_sku(
        scripts,
        keys,
        "mug",
        10,
        safety=2,
        mode="on_order",
        ttl=60,
        limit=3,
        now=NOW,
        policy=POLICY,
        presale=(5, eta, 0),
    )

    # then
    assert reply == [1, 10, 2, 0, 0, "on_order", 60, 3, *POLICY, 0, 5, eta, 0]
    assert await sku_hash(redis, keys, "mug") == {
        "on_hand": "10",
        "safety_stock": "2",
        "held": "0",
        "sold": "0",
        "mode": "on_order",
        "hold_ttl_seconds": "60",
        "per_user_limit": "3",
        **POLICY_FIELDS_SET,
        "backordered": "0",
        "presale_cap": "5",
        "presale_eta": str(eta),
        "presale_ends_at": "0",
    }
    shard = keys.shard_of(TENANT, "mug")
    assert await events(redis, keys, shard) == [
        {
            "type": "sku_set",
            "tenant": TENANT,
            "sku": "mug",
            "qty": "10",
            "res": "",
            "user": "",
            "on_hand": "10",
            "held": "0",
            "sold": "0",
            "bo": "0",
            "av0": "0",
            "av": "13",  # 10 - 2 on hand, 5 on backorder
            "at": str(NOW),
            "safety_stock": "2",
            "mode": "on_order",
            "hold_ttl_seconds": "60",
            "per_user_limit": "3",
            **POLICY_FIELDS_SET,
            "presale_cap": "5",
            "presale_eta": str(eta),
            "presale_ends_at": "0",
        }
    ]
    # no fingerprint: the idempotency record is not written
    assert await redis.exists(idem_key(keys, "mug")) == 0


async def test_update_keeps_held_and_sold_and_reports_the_on_hand_delta(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given 3 held and 2 sold
    await set_sku(scripts, keys, "lamp", 10)
    sold_id, held_id = new_id(keys, "lamp"), new_id(keys, "lamp")
    assert (await reserve(scripts, keys, sold_id, "ann", [("lamp", 2)]))[0] == 0
    assert (await confirm(scripts, keys, sold_id, ["lamp"]))[:2] == [0, "confirmed"]
    assert (await reserve(scripts, keys, held_id, "bob", [("lamp", 3)]))[0] == 0

    # when
    reply = await set_sku(scripts, keys, "lamp", 7, safety=1, mode="on_payment", ttl=30, limit=5, now=NOW + 1)

    # then
    assert reply == [0, 7, 1, 3, 2, "on_payment", 30, 5, *NO_POLICY, *NO_PRESALE_STATE]
    assert await sku_hash(redis, keys, "lamp") == {
        "on_hand": "7",
        "safety_stock": "1",
        "held": "3",
        "sold": "2",
        "mode": "on_payment",
        "hold_ttl_seconds": "30",
        "per_user_limit": "5",
        **dict.fromkeys(POLICY_FIELDS, "0"),
        **dict.fromkeys(["backordered", "presale_cap", "presale_eta", "presale_ends_at"], "0"),
    }
    last = (await events_of(redis, keys, "lamp"))[-1]
    assert (last["type"], last["qty"], last["at"]) == ("sku_set", "-3", str(NOW + 1))
    assert counters_of(last) == (7, 3, 2)


async def test_update_may_bring_on_hand_down_to_exactly_held_plus_sold_plus_safety(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    await set_sku(scripts, keys, "desk", 10)
    assert (await reserve(scripts, keys, new_id(keys, "desk"), "ann", [("desk", 4)]))[0] == 0

    reply = await set_sku(scripts, keys, "desk", 6, safety=2)

    assert reply[:5] == [0, 6, 2, 4, 0]
    state = await counters(redis, keys, "desk")
    state.check_invariant()
    assert state.available == 0


async def test_stock_conflict_when_new_stock_falls_below_held_plus_sold(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given held 4, sold 2 (on_hand 10)
    await set_sku(scripts, keys, "chair", 10)
    sold_id = new_id(keys, "chair")
    await reserve(scripts, keys, sold_id, "ann", [("chair", 2)])
    await confirm(scripts, keys, sold_id, ["chair"])
    await reserve(scripts, keys, new_id(keys, "chair"), "bob", [("chair", 4)])
    before = await snapshot(redis)

    # when on_hand - safety_stock = 7 - 2 = 5 < 6, and again with safety alone causing it
    by_on_hand = await set_sku(scripts, keys, "chair", 5)
    by_safety = await set_sku(scripts, keys, "chair", 10, safety=5, mode="on_payment")

    # then
    assert by_on_hand == [-4, 4, 2, 0, "on_hand"]
    assert by_safety == [-4, 4, 2, 0, "on_hand"]
    assert await snapshot(redis) == before


async def test_stock_conflict_on_create_when_safety_exceeds_on_hand(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    before = await snapshot(redis)

    reply = await set_sku(scripts, keys, "ghost", 3, safety=5)

    assert reply == [-4, 0, 0, 0, "on_hand"]
    assert await snapshot(redis) == before


async def test_replay_with_same_fingerprint_returns_first_result_and_changes_nothing(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given a first call under an Idempotency-Key
    record = idem_key(keys, "vase", "PUT /v1/skus/vase", "key-1")
    first = await set_sku(scripts, keys, "vase", 10, limit=2, fingerprint="fp-1", idem=record)
    assert first == [1, 10, 0, 0, 0, "pre_reserve", 900, 2, *NO_POLICY, *NO_PRESALE_STATE]
    assert await redis.hget(record, "fp") == "fp-1"
    assert 0 < await redis.ttl(record) <= IDEM_TTL
    before = await snapshot(redis)

    # when the same key and fingerprint come again (arguments that would change the SKU are ignored)
    replay = await set_sku(scripts, keys, "vase", 99, mode="on_payment", fingerprint="fp-1", idem=record)

    # then
    assert replay == first
    assert await snapshot(redis) == before


async def test_replay_of_a_refusal_replays_the_refusal(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a refused first call under a key
    record = idem_key(keys, "urn", "PUT /v1/skus/urn", "key-2")
    assert await set_sku(scripts, keys, "urn", 1, safety=4, fingerprint="fp-2", idem=record) == [-4, 0, 0, 0, "on_hand"]
    before = await snapshot(redis)

    # when the same request comes again: still refused, from the record
    assert await set_sku(scripts, keys, "urn", 1, safety=4, fingerprint="fp-2", idem=record) == [-4, 0, 0, 0, "on_hand"]

    # then
    assert await snapshot(redis) == before
    assert await redis.exists(keys.sku(keys.shard_of(TENANT, "urn"), TENANT, "urn")) == 0


async def test_idempotency_conflict_when_the_key_came_with_another_request(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    record = idem_key(keys, "bowl", "PUT /v1/skus/bowl", "key-3")
    await set_sku(scripts, keys, "bowl", 10, fingerprint="fp-a", idem=record)
    before = await snapshot(redis)

    reply = await set_sku(scripts, keys, "bowl", 20, fingerprint="fp-b", idem=record)

    assert reply == [-8]
    assert await snapshot(redis) == before
    assert (await counters(redis, keys, "bowl")).on_hand == 10


async def test_empty_fingerprint_ignores_and_leaves_an_existing_record(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given a record for another request in the key passed as KEYS[3]
    record = idem_key(keys, "cup")
    await redis.hset(record, mapping={"fp": "someone-else", "ans": "[-4,0,0]"})

    # when
    reply = await set_sku(scripts, keys, "cup", 5, idem=record)

    # then the SKU is created and the record is untouched
    assert reply[0] == 1
    assert await redis.hgetall(record) == {"fp": "someone-else", "ans": "[-4,0,0]"}
    assert await redis.ttl(record) == -1


async def test_concurrent_creates_of_one_sku_create_it_once(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # when 100 calls race to create one SKU with different stock
    replies = await asyncio.gather(*(set_sku(scripts, keys, "race", on_hand) for on_hand in range(1, 101)))

    # then exactly one created it, every call applied in some order, and the ledger chains exactly
    assert sorted(r[0] for r in replies) == [0] * 99 + [1]
    ledger = await events_of(redis, keys, "race")
    assert len(ledger) == 100
    previous = 0
    for event in ledger:
        assert int(event["qty"]) == int(event["on_hand"]) - previous
        previous = int(event["on_hand"])
    assert sorted(int(e["on_hand"]) for e in ledger) == list(range(1, 101))
    await assert_ledger_matches(redis, keys, "race")


async def test_concurrent_resets_and_reserves_never_break_the_invariant(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    # given
    await set_sku(scripts, keys, "flash", 50, safety=5)
    reserve_ids = [new_id(keys, "flash") for _ in range(60)]

    # when 60 one-unit reserves race 40 stock resets (on_hand 10..49) and 20 restocks
    reserved, resets, restocks = await race(
        [reserve(scripts, keys, rid, f"u{i}", [("flash", 1)]) for i, rid in enumerate(reserve_ids)],
        [set_sku(scripts, keys, "flash", 10 + i, safety=5) for i in range(40)],
        [adjust(scripts, keys, "flash", 1) for _ in range(20)],
    )

    # then
    granted = sum(1 for r in reserved if r[0] == 0)
    assert all(r[0] == 0 or r[:2] == [-2, 1] for r in reserved)
    for on_hand, reply in zip(range(10, 50), resets, strict=True):
        if reply[0] == -4:  # refused only when it had to be
            assert reply[1] + reply[2] > on_hand - 5
        else:
            assert reply[:3] == [0, on_hand, 5]
    assert all(r[0] == 0 for r in restocks)
    state = await counters(redis, keys, "flash")
    assert (state.held, state.sold) == (granted, 0)
    state.check_invariant()
    # after every single change, as the ledger records it
    for event in await events_of(redis, keys, "flash"):
        on_hand, held, sold = counters_of(event)
        assert held + sold <= on_hand - 5, event
    await assert_ledger_matches(redis, keys, "flash")
