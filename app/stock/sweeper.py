"""The expiry sweeper: reservations past their deadline stop holding stock with no client involved.

Every tick it asks every shard's expiry index for due reservation ids (one pipeline for all shards),
reads those parts' lines (one pipeline), then calls expire_holds.lua once per shard with due holds. The
script re-checks every part atomically, so several replicas sweeping at once, or a confirm racing the
sweep, never return units twice. Batches are bounded (STOCKHOLD_SWEEP_BATCH) so one call never blocks
Redis for long; a shard with more due holds is swept again at once rather than waiting a tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from app.stock.clock import now_ms
from app.stock.errors import ScriptCode
from app.stock.keys import KeySpace
from app.store.scripts import Scripts

if TYPE_CHECKING:
    from app.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


class ExpirySweeper:
    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: KeySpace,
        interval_ms: int,
        batch: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.metrics = metrics  # counts each tick of run(): its result, duration and the parts it expired
        self.scripts = scripts
        self.keys = keys
        self.interval = interval_ms / 1000
        self.batch = batch

    async def sweep_once(self, now: int | None = None) -> int:
        """One pass over every shard; returns the number of holds expired."""
        now = now_ms() if now is None else now
        expired = 0
        shards = list(self.keys.all_shards())
        while shards:
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard in shards:
                    pipe.zrangebyscore(self.keys.expiry(shard), "-inf", now, start=0, num=self.batch)
                due_per_shard: list[list[str]] = await pipe.execute()
            due = {shard: ids for shard, ids in zip(shards, due_per_shard, strict=True) if ids}
            if not due:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard, ids in due.items():
                    for rid in ids:
                        # field names and tenant only: the home part also holds the (larger) document
                        pipe.hkeys(self.keys.reservation(shard, rid))
                        pipe.hget(self.keys.reservation(shard, rid), "t")
                replies = await pipe.execute()
                parts = iter(zip(replies[0::2], replies[1::2], strict=True))  # (field names, tenant)
            again = []
            for shard, ids in due.items():
                reply = await self._expire(shard, ids, [next(parts) for _ in ids], now)
                if int(reply[0]) == ScriptCode.NOT_READY:
                    continue  # the shard awaits a rebuild, which reloads its deadlines
                expired += int(reply[0])
                # A shard that filled a whole batch and made progress may have more due holds: go again
                # for those only (no progress means the rest waits for the next tick, never a busy loop).
                if len(ids) == self.batch and int(reply[0]) > 0:
                    again.append(shard)
            shards = again
        return expired

    async def _expire(self, shard: int, ids: list[str], parts: list[tuple[list[str], str | None]], now: int) -> Any:
        keys = [self.keys.expiry(shard), self.keys.events(shard)]
        args: list[Any] = [now, len(ids)]
        for rid, (fields, owner) in zip(ids, parts, strict=True):
            tenant = owner or ""
            skus = [field[2:] for field in fields if field.startswith("q:")]
            keys.append(self.keys.reservation(shard, rid))
            for sku in skus:
                keys.append(self.keys.sku(shard, tenant, sku))
                keys.append(self.keys.user_counts(shard, tenant, sku))
            keys.extend(self.keys.lapses(shard, tenant, sku) for sku in skus)  # hoarding records
            keys.extend(self.keys.backorder_queue(shard, tenant, sku) for sku in skus)
            keys.extend(self.keys.channels(shard, tenant, sku) for sku in skus)
            args += [rid, len(skus), *skus]
        keys.append(self.keys.ready(shard))
        return await self.scripts.call("expire_holds", keys, args)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweeps every `interval` until `stop` is set; a failing tick is logged and retried next tick."""
        while not stop.is_set():
            started = time.perf_counter()
            expired: int | None = None
            try:
                expired = await self.sweep_once()
            except Exception:  # keep sweeping: a Redis blip must not end expiry for the process's life
                log.exception("expiry sweep failed; retrying next tick")
            if self.metrics is not None:
                self.metrics.count_sweep(started, expired)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
