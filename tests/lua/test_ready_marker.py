"""The ready marker (lua/includes/ready.lua) called directly: every stock script, on a shard whose marker is
gone (Redis lost its data, or a rebuild is under way), answers NOT_READY (-10) and changes nothing at all,
not even an idempotency record or an event; once the marker is back, the same call runs. claim_idempotency is
exempt, and still works without any marker.

Each call acts on real state, so a refusal that changes nothing is not a call that had nothing to do: a shard
with two SKUs, a live hold and a confirmed sale, the marker deleted only after that state was built."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.scripts import Scripts
from tests.helpers import mark_ready, snapshot
from tests.lua.support import (
    FAR_FUTURE,
    NOW,
    TENANT,
    adjust,
    claim,
    confirm,
    counters,
    expire_holds,
    new_id,
    receive,
    release,
    reserve,
    revert_confirm,
    set_channel,
    set_sku,
    skus_on_one_shard,
)

NOT_READY = [-10]


@dataclass(frozen=True)
class Shop:
    """One shard's state that every stock script has something to do with."""

    shard: int
    timed: str  # pre_reserve, 10 on hand, at most 5 per user
    paid: str  # on_payment (deducted at confirm), 5 on hand
    held_rid: str  # ann's live hold: 2 x timed (held) and 1 x paid (holding nothing), deadline NOW + 900 s
    sold_rid: str  # bob's confirmed purchase of 1 x timed
    new_rid: str  # an id no reservation has yet


async def open_shop(scripts: Scripts, keys: KeySpace) -> Shop:
    timed, paid = skus_on_one_shard(keys, "ready", 2)
    assert (await set_sku(scripts, keys, timed, 10, limit=5))[0] == 1
    assert (await set_sku(scripts, keys, paid, 5, mode="on_payment"))[0] == 1
    held_rid, sold_rid = new_id(keys, timed), new_id(keys, timed)
    assert (await reserve(scripts, keys, held_rid, "ann", [(timed, 2), (paid, 1)]))[:2] == [0, "held"]
    assert (await reserve(scripts, keys, sold_rid, "bob", [(timed, 1)]))[:2] == [0, "held"]
    assert (await confirm(scripts, keys, sold_rid, [timed]))[:2] == [0, "confirmed"]
    return Shop(keys.shard_of(TENANT, timed), timed, paid, held_rid, sold_rid, new_id(keys, timed))


Call = Callable[[Scripts, KeySpace, Shop], Awaitable[Any]]

# Every stock script, called as the service calls it (tests/lua/support.py lays out its KEYS with the shard's
# marker last), with the start of the reply it gives once the shard is ready. set_sku and adjust_stock carry
# an idempotency fingerprint: a refusal for NOT_READY must not be stored as the key's answer, or every retry
# after the rebuild would replay it instead of running.
CALLS: dict[str, tuple[Call, list[Any]]] = {
    "set_sku": (
        lambda s, k, shop: set_sku(s, k, shop.timed, 20, limit=5, fingerprint="fp-put"),
        [0, 20, 0, 2, 1, "pre_reserve", 900, 5],  # updated; held 2 (ann), sold 1 (bob)
    ),
    "adjust_stock": (
        lambda s, k, shop: adjust(s, k, shop.timed, 2, fingerprint="fp-adjust"),
        [0, 12, 0, 2, 1, "pre_reserve", 900, 5],
    ),
    "reserve": (
        lambda s, k, shop: reserve(s, k, shop.new_rid, "cyd", [(shop.timed, 1), (shop.paid, 1)]),
        [0, "held", NOW + 900_000],
    ),
    "confirm": (lambda s, k, shop: confirm(s, k, shop.held_rid, [shop.timed, shop.paid]), [0, "confirmed"]),
    "revert_confirm": (lambda s, k, shop: revert_confirm(s, k, shop.sold_rid, [shop.timed]), [0, "held"]),
    "release": (lambda s, k, shop: release(s, k, shop.held_rid, [shop.timed, shop.paid]), [0, "released"]),
    "receive_stock": (
        lambda s, k, shop: receive(s, k, shop.timed, 3, [], fingerprint="fp-receipt"),
        [0, 13, 0, 2, 1, "pre_reserve", 900, 5],  # on_hand 10 + 3, nothing backordered to fill
    ),
    "set_channel": (
        lambda s, k, shop: set_channel(s, k, shop.timed, "web", 3),
        [1, 3, 0, 0, 1],  # created: quota 3, used 0, priority 0, may borrow
    ),
    "expire_holds": (
        lambda s, k, shop: expire_holds(s, k, shop.shard, [(shop.held_rid, [shop.timed, shop.paid])], now=FAR_FUTURE),
        [1, 0],  # ann's hold expired, nothing skipped
    ),
}
# see test_claiming_an_idempotency_key_needs_no_marker and, in test_take_token.py,
# test_a_bucket_needs_no_marker: neither touches stock
EXEMPT = {"claim_idempotency", "take_token"}


def test_every_script_is_covered_or_exempt(scripts: Scripts) -> None:
    # A new script that touches stock must be added to CALLS (and take the marker as its last key).
    assert set(scripts.sources) == set(CALLS) | EXEMPT


@pytest.mark.parametrize("script", list(CALLS))
async def test_a_stock_script_without_the_ready_marker_refuses_and_changes_nothing(
    redis: Redis, scripts: Scripts, keys: KeySpace, script: str
) -> None:
    # given a shard with stock, a live hold and a sale, which then loses its ready marker
    shop = await open_shop(scripts, keys)
    call, _ = CALLS[script]
    await redis.delete(keys.ready(shop.shard))
    before = await snapshot(redis)

    # when the script runs on it
    reply = await call(scripts, keys, shop)

    # then it refuses, and nothing anywhere changed: counters, parts, per-user units, expiry index, the
    # stream (nothing was emitted), idempotency records and the other shards' markers
    assert reply == NOT_READY
    assert await snapshot(redis) == before


@pytest.mark.parametrize("script", list(CALLS))
async def test_the_same_call_runs_once_the_marker_is_back(
    redis: Redis, scripts: Scripts, keys: KeySpace, script: str
) -> None:
    # given a refusal for NOT_READY, then the shard rebuilt (the marker written back; its data was kept)
    shop = await open_shop(scripts, keys)
    call, works = CALLS[script]
    await redis.delete(keys.ready(shop.shard))
    assert await call(scripts, keys, shop) == NOT_READY
    await mark_ready(redis, keys)
    before = await snapshot(redis)

    # when the very same call is made again
    reply = await call(scripts, keys, shop)

    # then it runs: the answer a ready shard gives, a change made, and invariant 1 kept
    assert reply[: len(works)] == works
    assert await snapshot(redis) != before
    for sku in (shop.timed, shop.paid):
        (await counters(redis, keys, sku)).check_invariant()


async def test_claiming_an_idempotency_key_needs_no_marker(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    """claim_idempotency touches only its own record (it takes no marker: one key, fixed), never stock. What it
    guards (a reserve, confirm or release) runs stock scripts that refuse on a shard that is not ready, so a
    claim made meanwhile sells nothing; and a record is kept across a rebuild (app/recovery/rebuild.py), so a
    retry after the rebuild gets the same reference and re-runs the operation with the same id."""
    # given a Redis that lost every shard's marker
    await redis.delete(*(keys.ready(shard) for shard in keys.all_shards()))
    scope = "POST /v1/reservations"
    record = keys.idempotency(keys.shard_of_idempotency(TENANT, scope, "k"), TENANT, scope, "k")

    # when a key is claimed, then claimed again by a retry
    first = await claim(scripts, record, "fp", "rsv_1_first00000000000")
    again = await claim(scripts, record, "fp", "rsv_1_second0000000000")

    # then it works as on a ready shard: claimed once, the same reference handed to the retry
    assert first == [0, "rsv_1_first00000000000"]
    assert again == [1, "rsv_1_first00000000000"]
    assert await redis.hgetall(record) == {"fp": "fp", "ref": "rsv_1_first00000000000"}
    assert await redis.dbsize() == 1  # the record alone: no marker was needed, none was written
