"""The write-behind pipeline at a glance, per shard: what `/metrics` exports and `stockhold status`
prints. Redis tells what waits (app/worker/backlog.py) and whether the shard is rebuilt; PostgreSQL
tells what the workers persisted."""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.worker.backlog import ShardBacklog, read_backlog


@dataclass(frozen=True, slots=True)
class ShardStatus:
    backlog: ShardBacklog
    ready: bool
    oldest_unpersisted_age_s: float
    persisted_total: int | None  # events the workers wrote for this shard (None: PostgreSQL unreachable)
    last_persisted_id: str | None

    @property
    def shard(self) -> int:
        return self.backlog.shard


async def pipeline_status(redis: Redis, pg: asyncpg.Pool | None, keys: KeySpace) -> list[ShardStatus]:
    backlog = await read_backlog(redis, keys)
    async with redis.pipeline(transaction=False) as pipe:
        for shard in keys.all_shards():
            pipe.exists(keys.ready(shard))
        ready = await pipe.execute()
    progress: dict[int, tuple[int, str]] = {}
    reachable = pg is not None
    if pg is not None:
        try:
            rows = await pg.fetch("SELECT shard, events_persisted, last_event_id FROM worker_progress", timeout=2)
            progress = {r["shard"]: (r["events_persisted"], r["last_event_id"]) for r in rows}
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            reachable = False
    now = int(time.time() * 1000)
    return [
        ShardStatus(
            backlog=b,
            ready=bool(ok),
            oldest_unpersisted_age_s=b.oldest_age_s(now),
            persisted_total=progress.get(b.shard, (0, ""))[0] if reachable else None,
            last_persisted_id=progress.get(b.shard, (0, None))[1] if reachable else None,
        )
        for b, ok in zip(backlog, ready, strict=True)
    ]
