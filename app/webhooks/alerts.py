"""Per-SKU low-stock thresholds: kept in PostgreSQL (``sku_alert``), read by the dispatcher only; the
Redis SKU hash and the Lua scripts know nothing of them."""

from __future__ import annotations

from redis.asyncio import Redis

from app.stock.errors import NotReady, SkuNotFound
from app.stock.keys import KeySpace
from app.webhooks.schemas import AlertState
from app.webhooks.store import WebhookStore


class AlertBook:
    def __init__(self, redis: Redis, keys: KeySpace, store: WebhookStore) -> None:
        self.redis = redis
        self.keys = keys
        self.store = store

    async def _require_sku(self, tenant: str, sku: str) -> None:
        """404 sku_not_found unless the tenant has the SKU: Redis's SKU hash is the live catalogue (a SKU
        just created may not have reached PostgreSQL's `sku` yet)."""
        shard = self.keys.shard_of(tenant, sku)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.ready(shard))
            pipe.exists(self.keys.sku(shard, tenant, sku))
            ready, exists = await pipe.execute()
        if not ready:
            raise NotReady.for_shard(shard)
        if not exists:
            raise SkuNotFound(f"SKU {sku!r} does not exist", sku=sku)

    async def get(self, tenant: str, sku: str) -> AlertState:
        await self._require_sku(tenant, sku)
        return await self.store.get_alert(tenant, sku)

    async def put(self, tenant: str, sku: str, threshold: int | None) -> AlertState:
        await self._require_sku(tenant, sku)
        return await self.store.put_alert(tenant, sku, threshold)
