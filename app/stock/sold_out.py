"""The sold-out fast path: each API process remembers the SKUs it has seen sold out and refuses
reservations for them without a Redis round trip, until it sees stock back.

When a flash sale sells out, nearly every request after that is for a SKU with nothing left: answering
those from memory leaves Redis and the event loop to the requests that can still succeed. The memory
only ever refuses (409 insufficient_stock, as Redis would have answered), so invariant 1 does not depend
on it; what matters is that it lets go quickly when stock returns through a release, an expiry or a
restock. The process that makes such a change forgets the SKU at once. Changes made elsewhere (another
process, the sweeper of another process) all emit an event on the SKU's shard stream, so the refresh
waits on those streams (XREAD BLOCK, at most ``refresh_ms``) and re-reads the remembered SKUs' counters as
soon as anything lands there: a SKU comes back within a few milliseconds of the change (measured in
tests/api/test_sold_out.py), ``refresh_ms`` being the backstop. A book whose refresh fails (Redis unreachable)
forgets everything rather than refuse from stale knowledge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from app.stock.clock import now_ms
from app.stock.errors import InsufficientStock
from app.stock.keys import KeySpace
from app.stock.schemas import ReservationItem, available_units
from app.store.cluster import is_cluster

log = logging.getLogger(__name__)

SkuKey = tuple[str, str]  # (tenant, sku)
# What availability depends on, in available_units' argument order (the presale's ETA aside).
COUNTERS = ["on_hand", "safety_stock", "held", "sold", "backordered", "presale_cap", "presale_ends_at"]
# Under a flash sale the hot shard's stream never rests: the refresh then runs at most this often
# (about 200 pipelined reads a second per process), which also bounds how late it can be.
MIN_GAP_S = 0.005


class SoldOutBook:
    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        refresh_ms: int = 50,
        capacity: int = 1_000,
        on_hit: Callable[[], object] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.interval = refresh_ms / 1000
        self.capacity = capacity  # bounds memory and the refresh's size; past it, new SKUs are not kept
        self._known: set[SkuKey] = set()
        self._failing = False
        self._woke = 0.0  # monotonic time the last wait on the streams returned
        self._tips: dict[int, str] = {}  # shard -> newest event id read with its remembered SKUs' counters
        self._learned = asyncio.Event()  # set when a SKU is remembered: the idle refresh starts watching
        self.hits = 0  # reservations refused from memory
        self._on_hit = on_hit  # and told to the metrics (stockhold_sold_out_fast_path_hits_total)

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
        if self._on_hit is not None:
            self._on_hit()
        names = ", ".join(f"{s['sku']} (0 available, {s['requested']} requested)" for s in short)
        return InsufficientStock(f"not enough stock for {names}", items=short)

    def learn(self, tenant: str, sku: str, available: int) -> None:
        """A reservation refused here, or a change made here, showed the SKU's availability: remember it
        when nothing is left, forget it at once when there is (a restock made here needs no refresh)."""
        if available > 0:
            self._known.discard((tenant, sku))
        elif len(self._known) < self.capacity:
            self._known.add((tenant, sku))
            self._learned.set()

    def forget(self, tenant: str, skus: Sequence[str]) -> None:
        """Stock of these SKUs came back through this process (a release)."""
        for sku in skus:
            self._known.discard((tenant, sku))

    def forget_all(self) -> None:
        self._known.clear()
        self._tips.clear()

    async def refresh_once(self, only: set[int] | None = None) -> None:
        """Forgets every remembered SKU that has stock again (or no longer exists), on the shards in
        ``only`` (and any remembered SKU's shard not watched yet), or on every shard. Notes, for each shard
        read, the id of its stream's newest event read *before* the counters: any change after it is one
        the counters may not show yet, so the wait starts from there."""

        def due(shard: int) -> bool:
            return only is None or shard in only or shard not in self._tips

        known = [key for key in self._known if due(self.keys.shard_of(*key))]
        shards = sorted({self.keys.shard_of(tenant, sku) for tenant, sku in known})
        if shards:
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard in shards:
                    pipe.xrevrange(self.keys.events(shard), count=1)
                for tenant, sku in known:
                    pipe.hmget(self.keys.sku(self.keys.shard_of(tenant, sku), tenant, sku), COUNTERS)
                replies = await pipe.execute()
            tips, rows = replies[: len(shards)], replies[len(shards) :]
            for key, row in zip(known, rows, strict=True):
                if row[0] is None:
                    self._known.discard(key)
                    continue
                on_hand, safety, held, sold, backordered, cap, ends = (int(v or 0) for v in row)
                if available_units(on_hand, safety, held, sold, backordered, cap, ends, now_ms()) > 0:
                    self._known.discard(key)
            for shard, tip in zip(shards, tips, strict=True):
                self._tips[shard] = str(tip[0][0]) if tip else "0-0"
        still = {self.keys.shard_of(tenant, sku) for tenant, sku in self._known}
        self._tips = {shard: tip for shard, tip in self._tips.items() if shard in still}

    async def _until_a_change(self, stop: asyncio.Event) -> set[int] | None:
        """Waits until an event lands on a stream holding a remembered SKU (any stock change on its shard
        may be the one that brings it back: released, expired, restocked, by any process), or for
        ``refresh_ms`` at most. Returns the shards whose streams moved (None: the wait timed out, look
        at every shard). Every stock change emits its event in the script that made it, so the stream is
        the signal; no process needs to tell the others."""
        if not self._tips:  # nothing remembered: idle until the first SKU is learned (or stop)
            self._learned.clear()
            if not self._known:
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._learned.wait())]
                _, pending = await asyncio.wait(waits, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED)
                for waiter in pending:
                    waiter.cancel()
            return None
        # A busy shard's stream wakes us at once every time: refresh at most every MIN_GAP_S then. The gap
        # is kept before waiting, not after waking, so a change on a quiet stream is acted on at once.
        await asyncio.sleep(max(0.0, self._woke + MIN_GAP_S - time.monotonic()))
        if is_cluster(self.redis):
            # XREAD BLOCK takes one slot's streams at a time on a cluster: re-read every interval instead
            await asyncio.sleep(self.interval)
            return None
        shard_of = {self.keys.events(shard): shard for shard in self._tips}
        streams = {name: self._tips[shard] for name, shard in shard_of.items()}
        reply = await self.redis.xread(streams, count=1, block=max(1, round(self.interval * 1000)))  # type: ignore[arg-type]
        self._woke = time.monotonic()
        if not reply:
            return None
        return {shard_of[str(entry[0])] for entry in reply}  # entry: [stream name, its new events]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            only: set[int] | None = None
            try:
                while not stop.is_set():
                    await self.refresh_once(only)
                    self._failing = False
                    only = await self._until_a_change(stop)
            except Exception:
                # fail safe: without fresh counters, refuse nothing from memory
                self.forget_all()
                if not self._failing:  # once per outage, not every interval
                    log.warning("sold-out refresh failed; the fast path is off until Redis answers", exc_info=True)
                self._failing = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
