"""Rebuilding Redis from PostgreSQL, in process: after a worker drained the streams, a flushed Redis comes
back key for key; a shard without its ready marker refuses everything; a forced rebuild persists what its
stream still holds first; a rebuild never leaves more held + sold than on_hand allows; and a confirmed sale
survives losing Redis before any worker ran (confirm writes through)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from app.recovery.rebuild import Rebuilder
from app.stock.errors import InsufficientStock, LimitExceeded, NotReady
from app.stock.keys import KeySpace
from app.stock.policy import Eligibility, HoldCooldown
from app.stock.schemas import Adjustment, Mode, Reservation, SkuSettings
from app.stock.service import StockService
from app.stock.sweeper import ExpirySweeper
from app.worker.consumer import WriteBehindWorker
from tests.helpers import req, snapshot
from tests.stock.test_cross_shard import skus_on_distinct_shards

TENANT = "default"
FAR_FUTURE_MS = 10**13  # every deadline has passed by then


def sku_beside(keys: KeySpace, sku: str) -> str:
    """Another SKU on the same shard as `sku` (so one reservation part has two lines)."""
    shard = keys.shard_of(TENANT, sku)
    for i in range(10_000):
        other = f"beside-{i}"
        if keys.shard_of(TENANT, other) == shard:
            return other
    raise AssertionError("no SKU found on the same shard")


async def stock_state(redis: Redis, keys: KeySpace) -> dict[str, Any]:
    """What a rebuild must restore, key by key: SKU hashes, per-user hashes, reservation parts (without
    `ce`, the stream ids of the confirm's events: the stream is not part of the stock state) and expiry
    indexes. Not streams, idempotency records, leases or ready markers."""
    state: dict[str, Any] = {}
    for shard in keys.all_shards():
        hashes = (keys.sku(shard, "", "")[:-1], keys.user_counts(shard, "", "")[:-1], keys.reservation(shard, ""))
        async for key in redis.scan_iter(match=keys.shard_pattern(shard), count=1000):
            if key.startswith(hashes):
                fields = await redis.hgetall(key)  # type: ignore[misc]
                fields.pop("ce", None)
                state[key] = fields
            elif key == keys.expiry(shard):
                state[key] = await redis.zrange(key, 0, -1, withscores=True)
    return state


async def drain(redis: Redis, pg: asyncpg.Pool, keys: KeySpace) -> int:
    """Persists every event the shard streams hold (a worker consuming until the streams are idle)."""
    worker = WriteBehindWorker(redis, pg, keys, consumer="test-drain", batch=200, block_ms=10)
    await worker.ensure_groups()
    total = 0
    for _ in range(1_000):  # bounded: a workload of a few hundred events drains in a few steps
        handled = await worker.step()
        if handled == 0:
            return total
        total += handled
    raise AssertionError("the worker did not drain the streams")


async def views(
    service: StockService, skus: list[str], rids: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """What the service answers for every SKU and reservation (the API's view of the state)."""
    sku_views = {s: (await service.get_sku(TENANT, s)).model_dump() for s in skus}
    res_views = {r: (await service.get_reservation(TENANT, r)).model_dump() for r in rids}
    return sku_views, res_views


async def mixed_workload(service: StockService, sweeper: ExpirySweeper, keys: KeySpace) -> tuple[list[str], list[str]]:
    """Every mode and every reservation fate on several shards; returns (SKUs, reservation ids)."""
    a, b, c, d, e = skus_on_distinct_shards(keys, 5)
    a2 = sku_beside(keys, a)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=50, safety_stock=2, per_user_limit=4))
    await service.put_sku(TENANT, a2, SkuSettings(on_hand=5, hold_ttl_seconds=120, max_per_order=3))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=10, mode=Mode.ON_PAYMENT))
    await service.put_sku(
        TENANT, c, SkuSettings(on_hand=8, mode=Mode.ON_ORDER, per_user_limit=3, max_per_order=1)
    )  # the policy is dropped by the later update below
    await service.put_sku(TENANT, d, SkuSettings(on_hand=6, safety_stock=1, hold_ttl_seconds=60))
    await service.put_sku(  # catalogue only, never reserved; its purchase policy has every rule
        TENANT,
        e,
        SkuSettings(
            on_hand=7,
            max_per_order=2,
            eligibility=Eligibility(min_account_age_days=30, min_orders=1, min_member_days=7),
            hold_cooldown=HoldCooldown(after_lapses=3, within_minutes=10, cooldown_minutes=30),
        ),
    )
    await service.adjust(TENANT, d, Adjustment(delta=4, reason="restock"))
    await service.adjust(TENANT, e, Adjustment(delta=-2, reason="shrinkage"))
    # settings changed later: the rebuild must take the newest sku_set's settings
    await service.put_sku(TENANT, c, SkuSettings(on_hand=9, mode=Mode.ON_ORDER, per_user_limit=2))
    rids: list[str] = []

    async def hold(user: str, *items: tuple[str, int], channel: str | None = None) -> Reservation:
        reservation = await service.reserve(TENANT, req(user, *items, channel=channel))
        rids.append(reservation.id)
        return reservation

    # phase 1: holds the sweep expires (every pre_reserve deadline has passed at FAR_FUTURE_MS)
    await hold("u1", (a, 2))
    await hold("u2", (d, 1), (b, 1))  # spans shards: d's part expires, b's pending part lapses with it
    await hold("u3", (a, 1), (a2, 1), channel="app")  # one part with two lines
    await service.confirm(TENANT, (await hold("u4", (a, 1))).id)  # sold before the sweep: stays sold
    await hold("u5", (c, 2))  # on_order: no deadline, survives the sweep
    late = await hold("u6", (d, 1))
    assert await sweeper.sweep_once(now=FAR_FUTURE_MS) > 0
    await service.confirm(TENANT, late.id)  # paid after expiry: deducted directly (pst expired, cf d)

    # phase 2: what stays live
    await hold("u7", (a, 2))  # held with a deadline
    await service.confirm(TENANT, (await hold("u8", (b, 3))).id)  # on_payment: pending, then sold directly
    await hold("u9", (a, 1), (c, 1), (d, 1), channel="web")  # held, spans three shards
    await service.release(TENANT, (await hold("u1", (a, 1))).id)
    await service.release(TENANT, (await hold("u12", (c, 1))).id)  # on_order hold released
    await service.confirm(TENANT, (await hold("u10", (a, 1), (b, 1))).id)  # a from the hold, b directly
    with pytest.raises(InsufficientStock):
        await service.reserve(TENANT, req("u13", (a, 1), (d, 100)))  # a's part undone: leaves no part
    stuck = await hold("u14", (a, 1), (b, 2))  # a held, b pending
    await service.confirm(TENANT, (await hold("u15", (b, 5))).id)  # b: 3 + 1 + 5 of 10 sold
    with pytest.raises(InsufficientStock):
        await service.confirm(TENANT, stuck.id)  # a confirmed, b short: a's confirm reverted, held again
    await hold("u16", (b, 1))  # pending, no deadline
    await hold("u17", (a2, 2), (a, 1))  # home on a2, same shard as a: one live part with two lines
    return [a, a2, b, c, d, e], rids


async def test_a_flushed_redis_is_rebuilt_key_for_key(
    redis: Redis, pg: asyncpg.Pool, service: StockService, sweeper: ExpirySweeper, keys: KeySpace
) -> None:
    # given a mixed workload whose every event a worker persisted
    skus, rids = await mixed_workload(service, sweeper, keys)
    await drain(redis, pg, keys)
    before = await stock_state(redis, keys)
    views_before = await views(service, skus, rids)
    # (the workload left every kind of state behind, or the comparison below would prove little)
    assert {r["status"] for r in views_before[1].values()} == {"held", "pending", "confirmed", "released", "expired"}
    assert any(":usr:" in k for k in before) and any(k.endswith(":expiry") for k in before)
    policies = {sku: (v["max_per_order"], v["eligibility"], v["hold_cooldown"]) for sku, v in views_before[0].items()}
    assert policies[skus[1]][0] == 3 and policies[skus[3]] == (None, None, None)  # a2's cap; c's was dropped
    assert all(policies[skus[5]]), "e carries every kind of rule"

    # when Redis loses everything and is rebuilt from PostgreSQL
    await redis.flushdb()
    rebuilt = await Rebuilder(redis, pg, keys).rebuild()

    # then every shard was rebuilt and the stock state is exactly what it was
    assert rebuilt == list(keys.all_shards())
    assert await stock_state(redis, keys) == before
    assert await views(service, skus, rids) == views_before
    # and the rebuilt state is live: per-user units count (u7 holds 2 of a's 4; u5 holds 2 of c's 2) ...
    a, c = skus[0], skus[3]
    with pytest.raises(LimitExceeded):
        await service.reserve(TENANT, req("u7", (a, 3)))
    with pytest.raises(LimitExceeded):
        await service.reserve(TENANT, req("u5", (c, 1)))
    # ... and the rebuilt deadlines expire (u7's hold is the first live pre_reserve hold of phase 2)
    assert await sweeper.sweep_once(now=FAR_FUTURE_MS) > 0
    u7 = next(r for r, v in views_before[1].items() if v["user_id"] == "u7")
    assert (await service.get_reservation(TENANT, u7)).status == "expired"


async def test_a_shard_without_its_marker_refuses_everything_and_changes_nothing(
    redis: Redis, pg: asyncpg.Pool, service: StockService, sweeper: ExpirySweeper, keys: KeySpace
) -> None:
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=5))
    single = await service.reserve(TENANT, req("u1", (a, 1)))
    await redis.delete(keys.ready(keys.shard_of(TENANT, a)))
    before = await snapshot(redis)  # everything, streams included: a refusal emits no event either
    ledger_before = await pg.fetchval("SELECT count(*) FROM stock_movement")

    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("reserve", lambda: service.reserve(TENANT, req("u2", (a, 1)))),
        ("confirm", lambda: service.confirm(TENANT, single.id)),
        ("release", lambda: service.release(TENANT, single.id)),
        ("get_sku", lambda: service.get_sku(TENANT, a)),
        ("get_reservation", lambda: service.get_reservation(TENANT, single.id)),
        ("put_sku", lambda: service.put_sku(TENANT, a, SkuSettings(on_hand=9))),
        ("adjust", lambda: service.adjust(TENANT, a, Adjustment(delta=1, reason="restock"))),
    ]
    for name, call in calls:
        with pytest.raises(NotReady) as refused:
            await call()
        assert refused.value.code == "not_ready", name
    # the sweeper leaves the shard alone too (its due hold waits for the rebuild)
    await sweeper.sweep_once(now=FAR_FUTURE_MS)

    assert await snapshot(redis) == before
    assert await pg.fetchval("SELECT count(*) FROM stock_movement") == ledger_before
    # the other shard serves on
    assert (await service.get_sku(TENANT, b)).available == 5


async def test_a_reservation_spanning_a_shard_without_its_marker_is_refused_whole(
    redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    # given a reservation whose home shard (b's) is ready and whose other part (a's) is not
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=5))
    cross = await service.reserve(TENANT, req("u1", (b, 1), (a, 1)))
    await redis.delete(keys.ready(keys.shard_of(TENANT, a)))
    before = await stock_state(redis, keys)

    # when a new reservation and the existing one's confirm reach the shard that is not ready
    with pytest.raises(NotReady):
        await service.reserve(TENANT, req("u2", (b, 2), (a, 1)))
    with pytest.raises(NotReady):
        await service.confirm(TENANT, cross.id)

    # then b's part of each was undone (compensation events only): the stock state is unchanged and no
    # confirmation reached PostgreSQL
    assert await stock_state(redis, keys) == before
    confirmed = await pg.fetchval("SELECT count(*) FROM reservation_line WHERE status = 'confirmed'")
    assert confirmed == 0


async def test_reading_a_reservation_whose_other_part_awaits_a_rebuild_is_not_ready(
    redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    # The service's reads "check the marker too": a reservation's status combines all its parts, so one
    # part on a shard awaiting a rebuild (its data possibly gone, e.g. an emptied cluster node) makes the
    # answer unknowable, not whatever the home part alone says.
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=5))
    cross = await service.reserve(TENANT, req("u1", (b, 1), (a, 1)))
    await redis.delete(keys.ready(keys.shard_of(TENANT, a)))

    with pytest.raises(NotReady):
        await service.get_reservation(TENANT, cross.id)


@pytest.mark.parametrize("how", ["force_on_a_live_shard", "marker_deleted"])
async def test_rebuilding_a_shard_persists_its_stream_first(
    how: str, redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    # given events on a's shard that no worker persisted (only the confirm's write-through did)
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=10, per_user_limit=3))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=4, mode=Mode.ON_ORDER))
    held = await service.reserve(TENANT, req("u1", (a, 2)))
    cross = await service.reserve(TENANT, req("u2", (a, 1), (b, 1)))
    await service.release(TENANT, (await service.reserve(TENANT, req("u3", (a, 1)))).id)
    await service.confirm(TENANT, (await service.reserve(TENANT, req("u4", (a, 3)))).id)
    shard = keys.shard_of(TENANT, a)
    emitted = {str(eid) for eid, _ in await redis.xrange(keys.events(shard))}
    query = "SELECT event_id FROM stock_movement WHERE shard = $1"
    persisted = {r["event_id"] for r in await pg.fetch(query, shard)}
    assert persisted and persisted < emitted, "the confirm wrote through; the holds and release did not"
    before = await stock_state(redis, keys)
    views_before = await views(service, [a, b], [held.id, cross.id])
    rebuilder = Rebuilder(redis, pg, keys)
    assert await rebuilder.rebuild([shard]) == [], "without force a shard that has its marker is left alone"

    # when the shard is rebuilt from PostgreSQL
    if how == "force_on_a_live_shard":
        assert await rebuilder.rebuild([shard], force=True) == [shard]
    else:  # e.g. `reconcile --repair`, or an operator, deleted the marker: the data is still there
        await redis.delete(keys.ready(shard))
        assert await rebuilder.rebuild() == [shard]

    # then no event was lost: all of them reached the ledger before the shard was replaced ...
    assert emitted <= {r["event_id"] for r in await pg.fetch(query, shard)}
    # ... and the shard is what it was, and ready
    assert await stock_state(redis, keys) == before
    assert await views(service, [a, b], [held.id, cross.id]) == views_before
    assert await redis.exists(keys.ready(shard))


async def test_rebuild_drops_the_newest_holds_when_postgresql_holds_more_than_on_hand(
    redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    # given: on_hand 6, safety 1 (5 sellable); ann held 2 and released them, bob holds 2, cat bought 3
    (x,) = skus_on_distinct_shards(keys, 1)
    shard = keys.shard_of(TENANT, x)
    await service.put_sku(TENANT, x, SkuSettings(on_hand=6, safety_stock=1))
    ann = await service.reserve(TENANT, req("ann", (x, 2)))
    await asyncio.sleep(0.01)  # bob's hold is strictly newer than ann's
    bob = await service.reserve(TENANT, req("bob", (x, 2)))
    await service.release(TENANT, ann.id)
    cat = await service.reserve(TENANT, req("cat", (x, 3)))
    await service.confirm(TENANT, cat.id)
    await drain(redis, pg, keys)
    # and PostgreSQL lost ann's release (Redis died before the worker wrote it): it has her hold live,
    # so it holds 2 + 2 held + 3 sold = 7 > 5
    await pg.execute("UPDATE reservation_line SET status = 'held' WHERE reservation_id = $1", ann.id)
    await pg.execute("UPDATE sku SET held = 4 WHERE tenant = $1 AND sku = $2", TENANT, x)

    # when Redis is lost and rebuilt
    await redis.flushdb()
    await Rebuilder(redis, pg, keys).rebuild()

    # then invariant 1 holds: sales are facts, the newest hold (bob's) is dropped
    state = await service.get_sku(TENANT, x)
    assert state.held + state.sold <= state.on_hand - state.safety_stock
    assert (state.on_hand, state.held, state.sold, state.available) == (6, 2, 3, 0)
    assert (await service.get_reservation(TENANT, cat.id)).status == "confirmed"
    assert (await service.get_reservation(TENANT, bob.id)).status == "expired"
    assert (await service.get_reservation(TENANT, ann.id)).status == "held"
    assert await redis.hgetall(keys.user_counts(shard, TENANT, x)) == {"ann": "2", "cat": "3"}  # type: ignore[misc]
    assert not await redis.zscore(keys.expiry(shard), bob.id)
    # and the drop was emitted as an event, so PostgreSQL learns of it
    dropped = [f for _, f in await redis.xrange(keys.events(shard)) if f.get("reason", "").startswith("rebuild")]
    assert [(f["type"], f["res"], f["user"], f["qty"], f["st"]) for f in dropped] == [
        ("expired", bob.id, "bob", "2", "expired")
    ]
    assert dropped[0]["held"] == "2" and dropped[0]["sold"] == "3"  # counters after the drop

    # when the worker persists it, a second loss rebuilds the same state with nothing left to drop
    await drain(redis, pg, keys)
    line = "SELECT status FROM reservation_line WHERE reservation_id = $1"
    assert await pg.fetchval(line, bob.id) == "expired"
    after_first = await stock_state(redis, keys)
    await redis.flushdb()
    await Rebuilder(redis, pg, keys).rebuild()
    assert await stock_state(redis, keys) == after_first
    assert not [f for _, f in await redis.xrange(keys.events(shard)) if f.get("reason", "").startswith("rebuild")]


async def test_rebuild_raises_on_hand_when_postgresql_sold_more_than_its_catalogue_row_has(
    redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    # given 3 sold, and a catalogue row older than the sales (a restock's event was lost): on_hand 1
    (y,) = skus_on_distinct_shards(keys, 1)
    await service.put_sku(TENANT, y, SkuSettings(on_hand=3))
    await service.confirm(TENANT, (await service.reserve(TENANT, req("u1", (y, 3)))).id)
    await drain(redis, pg, keys)
    await pg.execute("UPDATE sku SET on_hand = 1 WHERE tenant = $1 AND sku = $2", TENANT, y)

    await redis.flushdb()
    await Rebuilder(redis, pg, keys).rebuild()

    # then the sales stand, on_hand covers them, nothing is sellable, and the change is an event
    state = await service.get_sku(TENANT, y)
    assert (state.on_hand, state.held, state.sold, state.available) == (3, 0, 3, 0)
    events = await redis.xrange(keys.events(keys.shard_of(TENANT, y)))
    raised = [f for _, f in events if f.get("reason", "").startswith("rebuild")]
    assert [(f["type"], f["qty"], f["on_hand"]) for f in raised] == [("adjusted", "2", "3")]


async def confirmed_then_redis_lost(
    redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> tuple[list[str], dict[str, Reservation]]:
    """Two sales (one spanning shards) confirmed, then Redis flushed before any worker ran and rebuilt.
    Returns the SKUs and what the service answered for each confirmed reservation before the loss."""
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=4))
    single = await service.reserve(TENANT, req("u1", (a, 2)))
    cross = await service.reserve(TENANT, req("u2", (a, 1), (b, 3), channel="app"))
    await asyncio.sleep(0.02)  # payment arrives a moment after the hold, as it does
    await service.confirm(TENANT, single.id)
    await service.confirm(TENANT, cross.id)
    answered = {r.id: await service.get_reservation(TENANT, r.id) for r in (single, cross)}
    assert await pg.fetchval("SELECT count(*) FROM worker_progress") == 0, "no worker ran"

    await redis.flushdb()  # the moment confirm answered: only its write-through reached PostgreSQL
    assert await Rebuilder(redis, pg, keys).rebuild() == list(keys.all_shards())
    return [a, b], answered


async def test_a_confirmed_sale_survives_losing_redis_before_any_worker_ran(
    redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    (a, b), answered = await confirmed_then_redis_lost(redis, pg, service, keys)

    assert (await service.get_sku(TENANT, a)).sold == 3
    assert (await service.get_sku(TENANT, b)).sold == 3
    for rid, before in answered.items():
        after = await service.get_reservation(TENANT, rid)
        assert after.status == "confirmed"
        assert (after.user_id, after.items, after.channel) == (before.user_id, before.items, before.channel)
    # the sale is not sold twice: b has 1 unit left, confirming again changes nothing
    assert (await service.get_sku(TENANT, b)).available == 1
    for rid in answered:
        assert (await service.confirm(TENANT, rid)).status == "confirmed"
    assert (await service.get_sku(TENANT, a)).sold == 3


async def test_a_confirmed_sale_keeps_its_times_across_a_redis_loss(
    redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    # A reservation's created_at and expires_at are facts about it (the write-through records both in the
    # reservation row): losing Redis must not move them.
    _, answered = await confirmed_then_redis_lost(redis, pg, service, keys)

    for rid, before in answered.items():
        after = await service.get_reservation(TENANT, rid)
        assert (after.created_at, after.expires_at) == (before.created_at, before.expires_at), rid
