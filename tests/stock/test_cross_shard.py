"""Reservations spanning shards are all-or-nothing by compensation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.stock.errors import InsufficientStock, LimitExceeded, ReservationBusy, SkuNotFound
from app.stock.keys import KeySpace
from app.stock.schemas import Adjustment, SkuSettings
from app.stock.service import StockService, combine_statuses
from tests.helpers import req, snapshot

TENANT = "default"


def skus_on_distinct_shards(keys: KeySpace, count: int) -> list[str]:
    chosen: dict[int, str] = {}
    i = 0
    while len(chosen) < count:
        sku = f"sku-{i}"
        chosen.setdefault(keys.shard_of(TENANT, sku), sku)
        i += 1
    return list(chosen.values())


async def test_second_shard_refusing_restores_first_shard_exactly(
    service: StockService, redis: Redis, keys: KeySpace
) -> None:
    # given two SKUs on two shards; the first has an earlier hold so its counters are not trivial
    first, second = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, first, SkuSettings(on_hand=10, per_user_limit=5))
    await service.put_sku(TENANT, second, SkuSettings(on_hand=1))
    await service.reserve(TENANT, req("zoe", (first, 2)))
    before = await snapshot(redis)
    first_key = keys.sku(keys.shard_of(TENANT, first), TENANT, first)
    counters_before = await redis.hgetall(first_key)  # type: ignore[misc]

    # when the first shard grants and the second refuses
    with pytest.raises(InsufficientStock) as refused:
        await service.reserve(TENANT, req("zoe", (first, 3), (second, 2)))

    # then the first shard's counters, per-user units, parts and expiry index are exactly as before
    assert refused.value.extra["items"] == [{"sku": second, "requested": 2, "available": 1}]
    assert await redis.hgetall(first_key) == counters_before  # type: ignore[misc]
    after = await snapshot(redis)
    events = {k for k in after if k.endswith(":events")}
    assert {k: v for k, v in after.items() if k not in events} == {k: v for k, v in before.items() if k not in events}
    # the compensation left its trace in the first shard's stream: 'held' then 'undone'
    first_events = keys.events(keys.shard_of(TENANT, first))
    kinds = [fields["type"] for _, fields in await redis.xrange(first_events)]
    assert kinds[-2:] == ["held", "undone"]


async def test_three_shards_third_refuses_limit(service: StockService, redis: Redis, keys: KeySpace) -> None:
    a, b, c = skus_on_distinct_shards(keys, 3)
    for sku in (a, b):
        await service.put_sku(TENANT, sku, SkuSettings(on_hand=5))
    await service.put_sku(TENANT, c, SkuSettings(on_hand=5, per_user_limit=1))
    before = {sku: await service.get_sku(TENANT, sku) for sku in (a, b, c)}

    with pytest.raises(LimitExceeded):
        await service.reserve(TENANT, req("yan", (a, 1), (b, 1), (c, 2)))

    assert {sku: await service.get_sku(TENANT, sku) for sku in (a, b, c)} == before


async def test_unknown_sku_on_a_later_shard_holds_nothing(service: StockService, keys: KeySpace) -> None:
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5))
    with pytest.raises(SkuNotFound):
        await service.reserve(TENANT, req("xia", (a, 1), (b, 1)))
    assert (await service.get_sku(TENANT, a)).held == 0


async def test_cross_shard_reservation_lifecycle(service: StockService, keys: KeySpace) -> None:
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5, hold_ttl_seconds=60))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=5, hold_ttl_seconds=30))
    held = await service.reserve(TENANT, req("wu", (a, 2), (b, 3)))
    assert held.status == "held"
    # one deadline for the whole reservation: the shortest ttl of its pre_reserve lines
    assert held.expires_at is not None
    assert 29 < (held.expires_at - held.created_at).total_seconds() <= 30
    fetched = await service.get_reservation(TENANT, held.id)
    assert (fetched.status, [i.sku for i in fetched.items]) == ("held", [a, b])

    confirmed = await service.confirm(TENANT, held.id)
    assert confirmed.status == "confirmed"
    assert ((await service.get_sku(TENANT, a)).sold, (await service.get_sku(TENANT, b)).sold) == (2, 3)
    assert (await service.get_reservation(TENANT, held.id)).status == "confirmed"


async def test_cross_shard_confirm_is_reverted_when_a_later_shard_lacks_stock(
    service: StockService, keys: KeySpace
) -> None:
    # given a cross-shard on_payment reservation (nothing held) and the second SKU sold out meanwhile
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5, mode="on_payment"))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=1, mode="on_payment"))
    pending = await service.reserve(TENANT, req("vic", (a, 2), (b, 1)))
    rival = await service.reserve(TENANT, req("uma", (b, 1)))
    await service.confirm(TENANT, rival.id)
    before = (await service.get_sku(TENANT, a), await service.get_sku(TENANT, b))

    # when the payment arrives, the first shard deducts and the second cannot
    with pytest.raises(InsufficientStock):
        await service.confirm(TENANT, pending.id)

    # then the first shard's deduction was reverted: confirmed whole or not at all
    assert (await service.get_sku(TENANT, a), await service.get_sku(TENANT, b)) == before
    assert (await service.get_reservation(TENANT, pending.id)).status == "pending"


async def test_cross_shard_release(service: StockService, keys: KeySpace) -> None:
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=5))
    held = await service.reserve(TENANT, req("tom", (a, 5), (b, 5)))
    released = await service.release(TENANT, held.id)
    assert released.status == "released"
    assert [(await service.get_sku(TENANT, s)).available for s in (a, b)] == [5, 5]


@pytest.mark.parametrize(
    ("parts", "overall"),
    [
        (["held"], "held"),
        (["held", "pending"], "held"),
        (["pending", "pending"], "pending"),
        (["expired", "held"], "expired"),
        (["confirmed", "confirmed"], "confirmed"),
        (["confirmed", "held"], "held"),
        (["released", "expired"], "released"),
    ],
)
def test_combined_status(parts: list[str], overall: str) -> None:
    assert combine_statuses(parts) == overall


async def test_duplicate_confirm_cannot_slip_between_a_failed_confirm_and_its_revert(
    service: StockService, keys: KeySpace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The duplicate-webhook race, forced: confirm #1 confirms part A, is refused on B, and is paused just
    before reverting A; meanwhile B is restocked and confirm #2 arrives. Without serialisation #2 sees A
    'already confirmed', confirms B and answers 200, then #1 reverts A: a paid reservation half sold.
    With the lease #2 waits for #1 to finish and then confirms the whole reservation."""
    # given a pending cross-shard reservation whose second SKU has no stock right now
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5, mode="on_payment"))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=1, mode="on_payment"))
    pending = await service.reserve(TENANT, req("pat", (a, 2), (b, 1)))
    await service.adjust(TENANT, b, Adjustment(delta=-1, reason="damaged"))
    reverting, resume = asyncio.Event(), asyncio.Event()
    real_call = service.scripts.call

    async def pause_first_revert(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "revert_confirm" and not reverting.is_set():
            reverting.set()
            await resume.wait()
        return await real_call(name, *args, **kwargs)

    monkeypatch.setattr(service.scripts, "call", pause_first_revert)

    # when
    first = asyncio.create_task(service.confirm(TENANT, pending.id))
    await asyncio.wait_for(reverting.wait(), 5)
    await service.adjust(TENANT, b, Adjustment(delta=1, reason="found it"))
    second = asyncio.create_task(service.confirm(TENANT, pending.id))
    await asyncio.sleep(0.3)  # long enough for #2 to finish if nothing holds it back
    resume.set()
    outcomes = await asyncio.gather(first, second, return_exceptions=True)

    # then #1 was refused, #2 confirmed, and the reservation is sold on both shards
    assert isinstance(outcomes[0], InsufficientStock)
    assert not isinstance(outcomes[1], BaseException)
    assert outcomes[1].status == "confirmed"
    assert (await service.get_reservation(TENANT, pending.id)).status == "confirmed"
    assert ((await service.get_sku(TENANT, a)).sold, (await service.get_sku(TENANT, b)).sold) == (2, 1)


async def test_an_error_between_shards_is_compensated(
    service: StockService, keys: KeySpace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis error on the second shard (its outcome unknown) undoes the first shard's hold."""
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=5))
    real_call = service.scripts.call
    reserves = 0

    async def second_reserve_fails(name: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal reserves
        if name == "reserve":
            reserves += 1
            if reserves == 2:
                raise RedisConnectionError("connection reset")
        return await real_call(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(service.scripts, "call", second_reserve_fails)
        with pytest.raises(RedisConnectionError):
            await service.reserve(TENANT, req("quin", (a, 2), (b, 1)))

    assert [(await service.get_sku(TENANT, s)).held for s in (a, b)] == [0, 0]
    assert (await service.reserve(TENANT, req("quin", (a, 2), (b, 1)))).status == "held"


async def test_a_held_lease_makes_others_wait_then_answers_busy(
    service: StockService, redis: Redis, keys: KeySpace, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = skus_on_distinct_shards(keys, 2)
    await service.put_sku(TENANT, a, SkuSettings(on_hand=5))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=5))
    held = await service.reserve(TENANT, req("rae", (a, 1), (b, 1)))
    monkeypatch.setattr("app.stock.service.LEASE_WAIT_SECONDS", 0.2)
    # another replica holds the reservation's lease (and, say, died holding it)
    lease = keys.lease(keys.shard_of(TENANT, a), held.id)
    assert await redis.set(lease, "someone-else", px=60_000)

    with pytest.raises(ReservationBusy):
        await service.release(TENANT, held.id)

    assert (await service.get_reservation(TENANT, held.id)).status == "held"
    await redis.delete(lease)  # the lease lapses
    assert (await service.release(TENANT, held.id)).status == "released"
