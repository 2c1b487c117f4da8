"""Notices a Redis that lost its data and has it rebuilt, without an operator.

Every API process (and every `stockhold worker`) runs one: each `interval_s` it checks every shard's
ready marker (one pipelined round) and rebuilds the shards that lack it. Meanwhile those shards answer
503 not_ready, /readyz fails, and nothing is sold from an empty Redis. With STOCKHOLD_AUTO_REBUILD=false
it only watches: an operator runs `stockhold rebuild` (after looking at what happened, say).

A Redis that lost its data usually restarted, which leaves every pooled connection dead; each would fail
one request with 503 after the shards are ready again. So when markers are missing, or a check meets a
broken connection, the idle connections are dropped and the next requests open fresh ones.

On a Redis Cluster it also reloads the slot map every SLOT_MAP_REFRESH_S, so every process learns of
replicas that joined or died (app/store/cluster.py) without waiting for a failure to tell it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import ConnectionError as RedisConnectionError

from app.recovery.rebuild import Rebuilder
from app.store.cluster import SLOT_MAP_REFRESH_S, is_cluster

log = logging.getLogger(__name__)


class ReadinessWatch:
    def __init__(self, rebuilder: Rebuilder, *, auto_rebuild: bool, interval_s: float = 0.5) -> None:
        self.rebuilder = rebuilder
        self.auto_rebuild = auto_rebuild
        self.interval_s = interval_s
        self.rebuilds = 0  # shards this process rebuilt

    async def check_once(self) -> list[int]:
        """Returns the shards still missing their marker after this check (and rebuild, when automatic)."""
        missing = await self.rebuilder.missing_shards()
        if missing:
            await self._drop_idle_connections()
        if missing and self.auto_rebuild:
            log.warning("shards %s have no ready marker (Redis lost its data?): rebuilding from PostgreSQL", missing)
            self.rebuilds += len(await self.rebuilder.rebuild(missing))
            missing = await self.rebuilder.missing_shards()
        return missing

    async def withdraw_slots(self, slots: list[int]) -> None:
        """Takes the shards living in `slots` out of service: their ready markers go, so their scripts refuse
        (503 not_ready) until the next check rebuilds them from PostgreSQL. For a failover that may have lost
        acknowledged writes (app/store/cluster.py): PostgreSQL holds every confirmation, and the worker wrote
        nothing the replica lacked, so the rebuilt shard has all that survived anywhere."""
        redis = self.rebuilder.redis
        keys = self.rebuilder.keys
        wanted = set(slots)
        shards = [s for s in keys.all_shards() if redis.keyslot(keys.ready(s)) in wanted]  # type: ignore[attr-defined]
        if shards:
            log.error("shards %s withdrawn after a failover that may have lost writes: rebuilding them", shards)
            for shard in shards:
                await redis.delete(keys.ready(shard))

    async def _drop_idle_connections(self) -> None:
        redis = self.rebuilder.redis
        if is_cluster(redis):
            # the cluster client drops a dead node's connections itself when it reloads the slot map
            return
        await redis.connection_pool.disconnect(inuse_connections=False)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_slot_map = loop.time() + SLOT_MAP_REFRESH_S
        while not stop.is_set():
            try:
                if is_cluster(self.rebuilder.redis) and loop.time() >= next_slot_map:
                    next_slot_map = loop.time() + SLOT_MAP_REFRESH_S
                    await self.rebuilder.redis.nodes_manager.initialize()  # type: ignore[attr-defined]
                await self.check_once()
            except RedisConnectionError as exc:
                log.warning("readiness check: Redis connection failed (%s); dropping idle connections", exc)
                with contextlib.suppress(Exception):
                    await self._drop_idle_connections()
            except Exception:  # Redis or PostgreSQL away: the next tick tries again
                log.exception("readiness check failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
