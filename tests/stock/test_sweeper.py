"""The expiry sweeper over many shards and more due holds than one batch."""

from __future__ import annotations

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.stock.schemas import ReservationItem, ReservationRequest, SkuSettings
from app.stock.service import StockService
from app.stock.sweeper import ExpirySweeper
from tests.stock.test_cross_shard import skus_on_distinct_shards

TENANT = "default"


async def test_sweeps_more_due_holds_than_a_batch_in_one_pass(
    service: StockService, sweeper: ExpirySweeper, keys: KeySpace, redis: Redis
) -> None:
    # given 240 holds over 4 shards, the sweeper's batch being 50
    skus = skus_on_distinct_shards(keys, 4)
    for sku in skus:
        await service.put_sku(TENANT, sku, SkuSettings(on_hand=100, hold_ttl_seconds=3600))
    for i in range(240):
        item = ReservationItem(sku=skus[i % 4], quantity=1)
        await service.reserve(TENANT, ReservationRequest(user_id=f"u{i}", items=[item]))
    assert sweeper.batch == 50

    # when: a sweep before the deadline expires nothing; one after it expires all of them
    assert await sweeper.sweep_once() == 0
    expired = await sweeper.sweep_once(now=10**13)

    # then
    assert expired == 240
    assert [(await service.get_sku(TENANT, s)).held for s in skus] == [0, 0, 0, 0]
    assert [await redis.zcard(keys.expiry(s)) for s in keys.all_shards()] == [0] * 16
    assert await sweeper.sweep_once(now=10**13) == 0
