"""Compares Redis with PostgreSQL per SKU: the counters and settings Redis serves against the ones a
rebuild from PostgreSQL would give (app/recovery/image.py).

Before comparing, whatever the shard streams still hold is persisted, so write-behind lag is not
reported as drift. Under live traffic a SKU that changes between the two reads can differ for a moment:
a SKU is reported only if it differs in every one of `rounds` comparisons.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from app.recovery.image import SkuImage, load_images
from app.recovery.rebuild import Rebuilder
from app.stock.keys import KeySpace

FIELDS = ("on_hand", "safety_stock", "held", "sold", "mode", "hold_ttl_seconds", "per_user_limit")


@dataclass(frozen=True, slots=True)
class Drift:
    shard: int
    tenant: str
    sku: str
    field: str
    redis: str  # "-" when the SKU is missing on that side
    postgres: str


def _values(image: SkuImage | None) -> dict[str, str]:
    if image is None:
        return {}
    return {f: str(getattr(image, f)) for f in FIELDS}


async def _redis_skus(redis: Redis, keys: KeySpace, shard: int) -> dict[tuple[str, str], dict[str, str]]:
    found: dict[tuple[str, str], dict[str, str]] = {}
    prefix = keys.sku(shard, "", "")[: -len(":")]  # "sh:{s}:sku:" without the separator
    names = [k async for k in redis.scan_iter(match=keys.sku(shard, "*", "*"), count=1000)]
    if not names:
        return found
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hmget(name, list(FIELDS))
        rows = await pipe.execute()
    for name, row in zip(names, rows, strict=True):
        tenant, _, sku = name[len(prefix) :].partition(":")
        if row[0] is not None:
            found[(tenant, sku)] = {f: str(v) for f, v in zip(FIELDS, row, strict=True)}
    return found


async def compare(redis: Redis, pg: asyncpg.Pool, keys: KeySpace, rounds: int = 3) -> list[Drift]:
    rebuilder = Rebuilder(redis, pg, keys)
    shards = list(keys.all_shards())
    persistent: dict[tuple[int, str, str, str], Drift] | None = None
    for attempt in range(rounds):
        if attempt:
            await asyncio.sleep(0.2)
        await rebuilder.drain(shards)
        images = await load_images(pg, keys, shards)
        found: dict[tuple[int, str, str, str], Drift] = {}
        for shard in shards:
            live = await _redis_skus(redis, keys, shard)
            expected = images[shard].skus
            for key in sorted(set(live) | set(expected)):
                have, want = live.get(key, {}), _values(expected.get(key))
                for f in FIELDS:
                    if have.get(f, "-") != want.get(f, "-"):
                        found[(shard, *key, f)] = Drift(shard, key[0], key[1], f, have.get(f, "-"), want.get(f, "-"))
        persistent = found if persistent is None else {k: v for k, v in found.items() if k in persistent}
        if not persistent:
            return []
    return sorted((persistent or {}).values(), key=lambda d: (d.shard, d.tenant, d.sku, d.field))
