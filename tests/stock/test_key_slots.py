"""Every key passed to every script call hashes to one cluster slot (the design's cluster-safety rule),
recorded over a workload that reaches every script: single- and cross-shard reservations, confirm,
revert, release, compensation, expiry, receipts filling backorders and idempotency claims."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.crc import key_slot

from app.stock.channels import ChannelSettings
from app.stock.errors import InsufficientStock
from app.stock.idempotency import IdempotencyRequest, IdempotencyStore
from app.stock.keys import KeySpace
from app.stock.presale import Presale
from app.stock.rate_limits import Bucket, RateLimiter
from app.stock.schemas import Adjustment, Receipt, ReservationItem, ReservationRequest, SkuSettings
from app.stock.service import StockService
from app.stock.sweeper import ExpirySweeper
from app.store.scripts import Scripts
from tests.stock.test_cross_shard import skus_on_distinct_shards

TENANT = "default"


async def test_every_script_call_stays_in_one_slot(
    service: StockService,
    sweeper: ExpirySweeper,
    idempotency: IdempotencyStore,
    keys: KeySpace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: dict[str, list[list[str]]] = defaultdict(list)
    original = Scripts.call

    async def recording_call(
        self: Scripts, name: str, keys_: Sequence[str], args: Sequence[Any], client: Any = None
    ) -> Any:
        calls[name].append(list(keys_))
        return await original(self, name, keys_, args, client)

    monkeypatch.setattr(Scripts, "call", recording_call)

    def req(user: str, *items: tuple[str, int], channel: str | None = None) -> ReservationRequest:
        lines = [ReservationItem(sku=s, quantity=q) for s, q in items]
        return ReservationRequest(user_id=user, items=lines, channel=channel)

    a, b, c = skus_on_distinct_shards(keys, 3)
    idem = IdempotencyRequest(key="k1", scope="PUT /v1/skus/x", fingerprint="f")
    await service.put_sku(TENANT, a, SkuSettings(on_hand=10, hold_ttl_seconds=1), idem)
    await service.put_sku(TENANT, b, SkuSettings(on_hand=10, mode="on_payment"))
    await service.put_sku(TENANT, c, SkuSettings(on_hand=1))
    await service.adjust(TENANT, a, Adjustment(delta=5, reason="restock"), idem)
    single = await service.reserve(TENANT, req("u1", (a, 1)))
    cross = await service.reserve(TENANT, req("u2", (a, 1), (b, 1)))
    await service.confirm(TENANT, single.id)
    with pytest.raises(InsufficientStock):
        await service.reserve(TENANT, req("u3", (a, 1), (c, 5)))  # compensation: release 'undo'
    taker = await service.reserve(TENANT, req("u4", (b, 10)))
    await service.confirm(TENANT, taker.id)
    with pytest.raises(InsufficientStock):
        await service.confirm(TENANT, cross.id)  # a deducts, b cannot: revert_confirm
    expiring = await service.reserve(TENANT, req("u5", (a, 1), (c, 1)))
    assert await sweeper.sweep_once(now=10**13) >= 1
    await service.release(TENANT, expiring.id)
    presale = Presale(cap=5, eta=datetime(2030, 1, 1, tzinfo=UTC))
    await service.put_sku(TENANT, c, SkuSettings(on_hand=1, presale=presale))
    await service.reserve(TENANT, req("u6", (c, 3)))  # 2 on backorder
    await service.receive(TENANT, c, Receipt(quantity=1))
    await service.put_channel(TENANT, a, "web", ChannelSettings(quota=2))
    await service.release(TENANT, (await service.reserve(TENANT, req("u7", (a, 1), channel="web"))).id)
    await idempotency.claim(TENANT, IdempotencyRequest(key="k2", scope="POST /v1/reservations", fingerprint="f"), "r")
    limiter = RateLimiter(service.scripts, keys, per_user=Bucket(1, 1), per_ip=Bucket(1, 1))
    await limiter.check_user(TENANT, "u1")
    await limiter.check_ip("192.0.2.1")

    expected = {"set_sku", "adjust_stock", "reserve", "confirm", "revert_confirm", "release", "expire_holds"}
    expected |= {"receive_stock", "set_channel"}
    assert expected | {"claim_idempotency", "take_token"} == set(calls) == set(service.scripts.sources)
    for name, key_lists in calls.items():
        for key_list in key_lists:
            slots = {key_slot(k.encode()) for k in key_list}
            assert len(slots) == 1, f"{name} touched keys in slots {slots}: {key_list}"


def test_every_shard_maps_to_a_distinct_slot() -> None:
    keys = KeySpace(16)
    slots = {key_slot(keys.expiry(shard).encode()) for shard in keys.all_shards()}
    assert len(slots) == 16
