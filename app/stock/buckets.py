"""Hot-SKU splitting: one SKU's stock spread over K buckets on different shards (so on different Redis
Cluster nodes), so that a flash sale on one SKU is served by K primaries instead of one.

A bucket is an ordinary SKU of the stock engine: its own hash, counters, event stream entries, ledger rows,
rebuild and reconcile, and invariant 1 enforced by the same scripts. Bucket 0 is the SKU itself; bucket
``i > 0`` is the internal SKU ``<sku>~<i>`` (``~`` is outside the API's SKU alphabet, so no client can name
one), placed on the shard ``i`` after the SKU's own (app/stock/keys.py), so K <= shard_count buckets never
share a shard. Because the buckets' on-hand units add up to the SKU's and each bucket refuses what it does
not have, the SKU as a whole can never sell more than exists, whatever the routing below does: routing
only decides which bucket is asked first.

Routing: a reservation line for a split SKU asks the bucket ``crc32(user_id) % K`` first (one user's
retries land on one bucket), then the others in turn; when no single bucket can cover the line, the line
is spread over the buckets that together can. The SKU is sold out only when every bucket is.

The split itself (K, and the highest K the SKU ever had, whose buckets may still hold units) is kept in
PostgreSQL's ``sku_split`` (the system of record: splitting moves no stock, so it is not an event) and
cached by every API process in a ``SplitMap``, reloaded when the version key in Redis moves (polled every
``REFRESH_MS``). A process that has not heard of a split yet only routes worse (everything to bucket 0);
it cannot oversell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from app.stock.keys import BUCKET_SEPARATOR, KeySpace

log = logging.getLogger(__name__)

SEPARATOR = BUCKET_SEPARATOR  # not in SKU_PATTERN: a bucket's name can never be a client's SKU
MAX_BUCKETS = 16  # never more than the default shard count: buckets must not share a shard
# How often each API process looks at the split version. A split or unsplit reaches every process's
# routing within this (plus one PostgreSQL read); a stale map routes worse, never oversells.
REFRESH_MS = 250

LOAD = "SELECT tenant, sku, buckets, highest FROM sku_split"


def bucket_sku(sku: str, index: int) -> str:
    """The internal SKU of bucket ``index`` (bucket 0 is the SKU itself)."""
    return sku if index == 0 else f"{sku}{SEPARATOR}{index}"


def parent_sku(name: str) -> str:
    """The client's SKU a bucket belongs to (a SKU that is no bucket is its own)."""
    return name.partition(SEPARATOR)[0]


def bucket_index(name: str) -> int:
    _, sep, index = name.partition(SEPARATOR)
    return int(index) if sep else 0


def is_bucket(name: str) -> bool:
    return SEPARATOR in name


def first_bucket(user_id: str, buckets: int) -> int:
    """The bucket a user's reservations ask first: stable per user, spread evenly over users."""
    return zlib.crc32(user_id.encode()) % buckets


def bucket_order(user_id: str, buckets: int) -> list[int]:
    start = first_bucket(user_id, buckets)
    return [(start + i) % buckets for i in range(buckets)]


@dataclass(frozen=True, slots=True)
class Split:
    buckets: int  # K: reservations are routed over buckets 0..K-1
    highest: int  # every bucket 0..highest-1 may hold units (a lowered K drains the rest); >= buckets

    def all_buckets(self) -> range:
        return range(self.highest)


class SplitMap:
    """Each API process's copy of the split SKUs, (tenant, sku) -> Split, from PostgreSQL."""

    def __init__(self, redis: Redis, pg: asyncpg.Pool, keys: KeySpace, refresh_ms: int = REFRESH_MS) -> None:
        self.redis = redis
        self.pg = pg
        self.keys = keys
        self.interval = refresh_ms / 1000
        self._splits: dict[tuple[str, str], Split] = {}
        self._tenants: set[str] = set()  # tenants with a split SKU: the others' reservations skip routing
        self._version: str | None = "never read"

    def get(self, tenant: str, sku: str) -> Split | None:
        return self._splits.get((tenant, sku))

    def has_tenant(self, tenant: str) -> bool:
        return tenant in self._tenants

    def set_local(self, tenant: str, sku: str, split: Split | None) -> None:
        """This process changed the split: its own routing follows at once (the others within REFRESH_MS)."""
        if split is None or split.highest <= 1:
            self._splits.pop((tenant, sku), None)
        else:
            self._splits[(tenant, sku)] = split
        self._tenants = {t for t, _ in self._splits}

    async def load(self) -> None:
        """Reads every split from PostgreSQL (the version first, so a change made meanwhile is read again)."""
        version = await self.redis.get(self.keys.split_version())
        rows = await self.pg.fetch(LOAD)
        self._splits = {(r["tenant"], r["sku"]): Split(r["buckets"], r["highest"]) for r in rows if r["highest"] > 1}
        self._tenants = {t for t, _ in self._splits}
        self._version = None if version is None else str(version)

    async def refresh_once(self) -> bool:
        """Reloads when the version moved (or vanished with a Redis that lost its data). Returns whether it did."""
        version = await self.redis.get(self.keys.split_version())
        if (None if version is None else str(version)) == self._version:
            return False
        await self.load()
        return True

    async def announce(self) -> None:
        """Call after committing a split change to PostgreSQL: every process reloads."""
        await self.redis.incr(self.keys.split_version())

    async def run(self, stop: asyncio.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                await self.refresh_once()
                failing = False
            except Exception:
                # keep routing with what we know: a stale map routes worse, it cannot oversell
                if not failing:
                    log.warning("split map refresh failed; routing with the last map read", exc_info=True)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
