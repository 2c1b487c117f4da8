"""The sold-out fast path: each API process remembers the SKUs it has seen sold out and refuses
reservations for them without a Redis round trip, until it sees stock back.

When a flash sale sells out, nearly every request after that is for a SKU with nothing left: answering
those from memory leaves Redis and the event loop to the requests that can still succeed. The memory
only ever refuses (409 insufficient_stock, as Redis would have answered), so invariant 1 does not depend
on it; what matters is that it lets go quickly when stock returns through a release, an expiry or a
restock. The process that makes such a change forgets the SKU at once; for changes made elsewhere (another
process, the sweeper of another process), every ``refresh_ms`` one pipelined read of the remembered SKUs' counters
forgets each one with stock again, so a SKU comes back within about one interval plus a round trip of
the change (measured in tests/stock/test_sold_out.py). A book whose refresh fails (Redis unreachable)
forgets everything rather than refuse from stale knowledge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from redis.asyncio import Redis

from app.stock.errors import InsufficientStock
from app.stock.keys import KeySpace
from app.stock.schemas import ReservationItem, available_units

log = logging.getLogger(__name__)

SkuKey = tuple[str, str]  # (tenant, sku)
COUNTERS = ["on_hand", "safety_stock", "held", "sold"]


class SoldOutBook:
    def __init__(self, redis: Redis, keys: KeySpace, refresh_ms: int = 50, capacity: int = 10_000) -> None:
        self.redis = redis
        self.keys = keys
        self.interval = refresh_ms / 1000
        self.capacity = capacity  # bounds memory and the refresh's size; past it, new SKUs are not kept
        self._known: set[SkuKey] = set()
        self._failing = False
        self.hits = 0  # reservations refused from memory, for metrics

    def __contains__(self, key: SkuKey) -> bool:
        return key in self._known

    def refusal(self, tenant: str, items: Sequence[ReservationItem]) -> InsufficientStock | None:
        """The answer Redis would give a reservation naming a SKU known sold out, or None."""
        if not self._known:
            return None
        short = [
            {"sku": item.sku, "requested": item.quantity, "available": 0}
            for item in items
            if (tenant, item.sku) in self._known
        ]
        if not short:
            return None
        self.hits += 1
        names = ", ".join(f"{s['sku']} (0 available, {s['requested']} requested)" for s in short)
        return InsufficientStock(f"not enough stock for {names}", items=short)

    def learn(self, tenant: str, sku: str, available: int) -> None:
        """This process read or changed the SKU's availability: remember it when nothing is left, forget
        it at once when there is (a restock or release made here needs no refresh to be sold)."""
        if available > 0:
            self._known.discard((tenant, sku))
        elif len(self._known) < self.capacity:
            self._known.add((tenant, sku))

    def forget(self, tenant: str, skus: Sequence[str]) -> None:
        """Stock of these SKUs came back through this process (a release)."""
        for sku in skus:
            self._known.discard((tenant, sku))

    def forget_all(self) -> None:
        self._known.clear()

    async def refresh_once(self) -> None:
        """Forgets every remembered SKU that has stock again (or no longer exists)."""
        known = list(self._known)
        if not known:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant, sku in known:
                pipe.hmget(self.keys.sku(self.keys.shard_of(tenant, sku), tenant, sku), COUNTERS)
            rows = await pipe.execute()
        for key, row in zip(known, rows, strict=True):
            if row[0] is None or available_units(*(int(v) for v in row)) > 0:
                self._known.discard(key)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh_once()
                self._failing = False
            except Exception:
                # fail safe: without fresh counters, refuse nothing from memory
                self.forget_all()
                if not self._failing:  # once per outage, not every interval
                    log.warning("sold-out refresh failed; the fast path is off until Redis answers", exc_info=True)
                self._failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
