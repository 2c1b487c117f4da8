"""The write-behind worker: shard event streams -> PostgreSQL ledger, at least once, written once.

Every shard's stream is read through one consumer group (``GROUP``); each consumer (a worker process or
an API process running the worker in-process) reads new entries with XREADGROUP, writes them in one
transaction, and XACKs only after the commit. A consumer that dies leaves its entries pending; any live
consumer takes them over with XAUTOCLAIM once they have been idle for ``claim_idle_ms``. Writes are
idempotent by event id, so a redelivered entry is never written twice. Every ``trim_every_s`` the
streams are trimmed below what the group acknowledged (app/worker/backlog.py).

A Redis that lost its data also lost the groups: XREADGROUP answers NOGROUP, and the worker creates
them again on the new, empty streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.stock.events import StreamEvent, parse_entries
from app.stock.keys import KeySpace
from app.store.cluster import ReplicationLag, read_group
from app.worker.backlog import PERSISTING_GROUP, trim_persisted
from app.worker.ledger import persist_events

log = logging.getLogger(__name__)

GROUP = PERSISTING_GROUP


class WriteBehindWorker:
    def __init__(
        self,
        redis: Redis,
        pg: asyncpg.Pool,
        keys: KeySpace,
        consumer: str,
        batch: int = 500,
        block_ms: int = 100,
        claim_idle_ms: int = 30_000,
        max_batch: int | None = None,
        wait_replicas: int = 1,
    ) -> None:
        self.redis = redis
        self.pg = pg
        self.keys = keys
        self.consumer = consumer
        self.batch = batch
        # Behind (a stream filled the last read), the next read asks for twice as many, up to max_batch:
        # a step costs a few round trips whatever its size, and under load each waits for a turn of a busy
        # event loop, so bigger steps are how a worker catches up. Caught up, back to `batch`, which holds
        # the loop for less at a time.
        self.max_batch = max(batch, max_batch if max_batch is not None else 4 * batch)
        self.count = batch  # what the next read of new entries asks for, per stream
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.persisted_total = 0  # new ledger rows this consumer wrote
        self.acknowledged_total = 0  # stream entries it persisted and acknowledged (read or taken over)
        # On a cluster: entries are persisted only once the replica has them too (app/store/cluster.py)
        self.wait_replicas = wait_replicas
        self._stream_shard = {keys.events(s): s for s in keys.all_shards()}

    async def ensure_groups(self) -> None:
        """Creates the group on every shard stream (from the stream's start, so events emitted before the
        first worker ran are persisted too). Idempotent."""
        for stream in self._stream_shard:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)

    async def step(self, own_pending: bool = False) -> int:
        """Reads up to `count` new entries per shard, persists them in one transaction, then XACKs them.
        Returns the number of entries handled (0 when the streams were idle for `block_ms`).
        `own_pending`: re-read the entries this consumer was given and has not acknowledged (after a
        failed step) instead of new ones."""
        count = self.batch if own_pending else self.count
        reply = await read_group(
            self.redis,
            GROUP,
            self.consumer,
            dict.fromkeys(self._stream_shard, "0" if own_pending else ">"),
            count=count,
            block_ms=None if own_pending else self.block_ms,
            wait_replicas=self.wait_replicas,
        )
        if not own_pending:
            behind = any(len(entries) >= count for _, entries in reply or [])
            self.count = min(2 * count, self.max_batch) if behind else self.batch
        events = [e for stream, entries in reply or [] for e in parse_entries(self._stream_shard[stream], entries)]
        return await self._persist_and_ack(events)

    async def reclaim(self) -> int:
        """Takes over entries another consumer left pending for longer than `claim_idle_ms`, persists
        and acknowledges them. Returns the number of entries handled."""
        events: list[StreamEvent] = []
        for stream, shard in self._stream_shard.items():
            reply = await self.redis.xautoclaim(
                stream, GROUP, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=self.batch
            )
            events += parse_entries(shard, reply[1])
        return await self._persist_and_ack(events)

    async def _persist_and_ack(self, events: list[StreamEvent]) -> int:
        if not events:
            return 0
        async with self.pg.acquire() as conn, conn.transaction():
            self.persisted_total += await persist_events(conn, events, progress=True)
        # Only after the commit: a crash before this line redelivers the batch, written once regardless.
        by_stream: dict[str, list[str]] = {}
        for event in events:
            by_stream.setdefault(self.keys.events(event.shard), []).append(event.event_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, GROUP, *ids)
            await pipe.execute()
        self.acknowledged_total += len(events)
        return len(events)

    async def trim(self) -> int:
        """Trims every shard stream below what the group acknowledged; returns entries removed."""
        return await trim_persisted(self.redis, self.keys)

    async def run(self, stop: asyncio.Event, reclaim_every_s: float = 5.0, trim_every_s: float = 1.0) -> None:
        """Consumes until `stop` is set; a failing step (PostgreSQL or Redis away) is retried after a
        pause, its entries staying pending until a step succeeds."""
        await self.ensure_groups()
        loop = asyncio.get_running_loop()
        next_reclaim = next_trim = loop.time()
        # A failed step leaves its entries pending on this consumer: they are retried first (not after
        # claim_idle_ms, which is for entries of consumers that died), so a backlog drains as soon as
        # PostgreSQL is back. A consumer restarted under its old name also starts with its own.
        retry_own = True
        while not stop.is_set():
            try:
                if loop.time() >= next_reclaim:
                    await self.reclaim()
                    next_reclaim = loop.time() + reclaim_every_s
                if retry_own:
                    retry_own = await self.step(own_pending=True) > 0
                else:
                    await self.step()
                if loop.time() >= next_trim:
                    await self.trim()
                    next_trim = loop.time() + trim_every_s
            except Exception as exc:
                if isinstance(exc, ReplicationLag):  # the read entries stay pending: read again shortly
                    log.warning("write-behind waits for the replica: %s", exc)
                    retry_own = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=0.2)
                    continue
                if isinstance(exc, ResponseError) and ("NOGROUP" in str(exc) or "UNBLOCKED" in str(exc)):
                    log.warning("consumer group gone (Redis lost its data?); creating it again")
                    with contextlib.suppress(Exception):
                        await self.ensure_groups()
                    continue
                log.exception("write-behind step failed; retrying")
                retry_own = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
