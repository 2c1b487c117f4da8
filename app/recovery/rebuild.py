"""Rebuilds Redis shards from PostgreSQL, and the ready markers that say a shard was rebuilt.

Every stock script refuses to run on a shard without its marker (lua/includes/ready.lua), so a Redis
that lost its data (restarted empty, flushed, failed over to an empty replica) answers not_ready instead
of selling from nothing. Rebuilding a shard, under a per-shard lock so one process does it:

1. persists whatever its event stream still holds (a marker deleted on purpose, e.g. by
   ``reconcile --repair``, leaves the data and its unpersisted events in place);
2. loads the shard's image from PostgreSQL (app/recovery/image.py);
3. replaces the shard's stock keys with it (no script can run meanwhile: the marker is absent);
4. in one MULTI: the events of any hold the image dropped to keep invariant 1, and the marker.

Idempotency records and the stream itself are kept; a Redis that lost its data lost them too, which
means a retried request after such a loss runs again (see README, "Recovery").
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from app.recovery.image import PartImage, ShardImage, SkuImage, load_images
from app.stock.events import parse_entries
from app.stock.keys import KeySpace
from app.stock.schemas import available_units
from app.worker.ledger import persist_events

log = logging.getLogger(__name__)

# A rebuild of one shard takes well under this; a crashed rebuilder frees the shard after it.
REBUILD_LEASE_S = 120.0
_CHUNK = 1000  # commands per pipeline round while loading


class Rebuilder:
    def __init__(self, redis: Redis, pg: asyncpg.Pool, keys: KeySpace) -> None:
        self.redis = redis
        self.pg = pg
        self.keys = keys
        self.owner = f"{socket.gethostname()}-{os.getpid()}"

    async def missing_shards(self) -> list[int]:
        """Shards without their ready marker."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in self.keys.all_shards():
                pipe.exists(self.keys.ready(shard))
            present = await pipe.execute()
        return [shard for shard, ok in zip(self.keys.all_shards(), present, strict=True) if not ok]

    async def rebuild(self, shards: Iterable[int] | None = None, *, force: bool = False) -> list[int]:
        """Rebuilds `shards` (default: those missing their marker). Without `force` a shard that has its
        marker is left alone; with it, the marker is removed first (the shard answers not_ready while it
        is rebuilt). Shards another process is rebuilding are skipped. Returns the shards rebuilt."""
        targets = sorted(set(shards) if shards is not None else await self.missing_shards())
        locks: dict[int, Lock] = {}
        try:
            for shard in targets:
                lock = Lock(self.redis, self.keys.rebuild_lock(shard), timeout=REBUILD_LEASE_S, blocking=False)
                if await lock.acquire():
                    locks[shard] = lock
            if force and locks:
                await self.redis.delete(*(self.keys.ready(s) for s in locks))
            elif not force:
                still_missing = set(await self.missing_shards())
                for shard in [s for s in locks if s not in still_missing]:
                    await _release(locks.pop(shard))
            if not locks:
                return []
            started = time.perf_counter()
            drained = await self.drain(list(locks))
            images = await load_images(self.pg, self.keys, locks)
            for shard in sorted(locks):
                await self._write(images[shard])
            log.info(
                "rebuilt shards %s from PostgreSQL in %.3fs (%d stream events persisted first): %s",
                sorted(locks),
                time.perf_counter() - started,
                drained,
                ", ".join(f"{s}: {len(images[s].skus)} SKUs, {len(images[s].parts)} parts" for s in sorted(locks)),
            )
            return sorted(locks)
        finally:
            for lock in locks.values():
                await _release(lock)

    async def drain(self, shards: list[int], until: Mapping[int, str] | None = None) -> int:
        """Persists every event still in the shards' streams (idempotent: most are persisted already).
        `until`: per shard, the newest entry id to persist; under live traffic a stream grows while it is
        read, and draining to its end might never finish."""
        total = 0
        for shard in shards:
            start, end = "-", (until or {}).get(shard, "+")
            while True:
                entries = await self.redis.xrange(self.keys.events(shard), min=start, max=end, count=_CHUNK)
                if not entries:
                    break
                async with self.pg.acquire() as conn, conn.transaction():
                    total += await persist_events(conn, parse_entries(shard, entries))
                start = "(" + str(entries[-1][0])
        return total

    async def _write(self, image: ShardImage) -> None:
        shard, k = image.shard, self.keys
        stale = [key async for key in self.redis.scan_iter(match=k.shard_pattern(shard), count=1000)]
        stale = [key for key in stale if k.rebuilt_from_postgres(shard, key)]
        commands: list[tuple[str, tuple[Any, ...]]] = [
            ("delete", tuple(stale[i : i + 500])) for i in range(0, len(stale), 500)
        ]
        for sku in image.skus.values():
            mapping = {
                "on_hand": sku.on_hand,
                "safety_stock": sku.safety_stock,
                "held": sku.held,
                "sold": sku.sold,
                "mode": sku.mode,
                "hold_ttl_seconds": sku.hold_ttl_seconds,
                "per_user_limit": sku.per_user_limit,
                **sku.policy,
                "backordered": sku.backordered,
                "presale_cap": sku.presale_cap,
                "presale_eta": sku.presale_eta,
                "presale_ends_at": sku.presale_ends_at,
            }
            if sku.channels:  # absent: none, as set_channel-5.lua leaves a SKU that never had one
                mapping["channels"] = len(sku.channels)
            commands.append(("hset", (k.sku(shard, sku.tenant, sku.sku), mapping)))
            if sku.channels:
                fields = {f: v for name, c in sku.channels.items() for f, v in c.fields(name).items()}
                commands.append(("hset", (k.channels(shard, sku.tenant, sku.sku), fields)))
        for (tenant, sku_name), users in image.users.items():
            commands.append(("hset", (k.user_counts(shard, tenant, sku_name), users)))
        for part in image.parts:
            commands.append(("hset", (k.reservation(shard, part.reservation_id), _part_fields(part, image))))
        for (tenant, listing), components in image.listings.items():
            commands.append(("set", (k.listing(shard, tenant, listing), components)))
        expiry = image.expiry()
        if expiry:
            commands.append(("zadd", (k.expiry(shard), expiry)))
        for (tenant, sku_name), queued in image.backorder_queues().items():
            commands.append(("zadd", (k.backorder_queue(shard, tenant, sku_name), queued)))
        for i in range(0, len(commands), _CHUNK):
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, args in commands[i : i + _CHUNK]:
                    if name == "hset":
                        pipe.hset(args[0], mapping=args[1])
                    else:
                        getattr(pipe, name)(*args)
                await pipe.execute()
        async with self.redis.pipeline(transaction=True) as pipe:
            for fields in _rebuild_events(image):
                pipe.xadd(k.events(shard), fields)  # type: ignore[arg-type]  # values are str | int
            marker = {"rebuilt_at_ms": int(time.time() * 1000), "by": self.owner, "source": "postgresql"}
            pipe.set(k.ready(shard), orjson.dumps(marker))
            await pipe.execute()


async def _release(lock: Lock) -> None:
    with contextlib.suppress(LockError):  # it lapsed: whoever holds it now owns it
        await lock.release()


def _part_fields(part: PartImage, image: ShardImage) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "st": part.status,
        "u": part.user_id,
        "t": part.tenant,
        "exp": part.deadline,
        "c": part.created_at,
        "n": len(part.lines),
    }
    for line in part.lines:
        fields[f"q:{line.sku}"] = line.quantity
        fields[f"h:{line.sku}"] = 1 if line.held else 0
        if part.backordered(line):
            fields[f"b:{line.sku}"] = line.backordered
        sku = image.skus.get((part.tenant, line.sku))
        # quota units only where the channel is known: releasing them gives them back to its `u:`
        if part.units(line)[2] and line.from_quota and sku is not None and part.channel in sku.channels:
            fields[f"c:{line.sku}"] = line.from_quota
    if part.channel:
        fields["ch"] = part.channel
    if part.doc is not None:
        fields["doc"] = part.doc
    if part.status == "confirmed":
        fields["pst"] = part.status_before or "held"
        fields["cf"] = part.confirmed_how or "h"
    return fields


Event = dict[str, Any]


def _rebuild_events(image: ShardImage) -> list[Event]:
    """Events for what the rebuild itself changed (see image.py): on_hand raised to cover sales, holds
    dropped to keep invariant 1. Counters in them run up to the image's final values."""
    now = int(time.time() * 1000)
    events: list[Event] = []
    # (held, backordered) per SKU, walked back to before the drops, then replayed forward
    counts = {key: [sku.held, sku.backordered] for key, sku in image.skus.items()}
    dropped = [p for p in image.parts if p.dropped]
    for part in dropped:
        for line in part.lines:
            if line.held:
                counts[(part.tenant, line.sku)][0] += line.quantity
                counts[(part.tenant, line.sku)][1] += line.backordered

    def event(kind: str, sku: SkuImage, qty: int, on_hand_before: int, held_before: int, bo_before: int) -> Event:
        held, bo = counts[(sku.tenant, sku.sku)]
        return {
            "type": kind,
            "tenant": sku.tenant,
            "sku": sku.sku,
            "qty": qty,
            "on_hand": sku.on_hand,
            "held": held,
            "sold": sku.sold,
            "bo": bo,
            "av0": _available(sku, on_hand_before, held_before, bo_before, now),
            "av": _available(sku, sku.on_hand, held, bo, now),
            "at": now,
        }

    for (tenant, sku_name), delta in image.raised.items():
        sku = image.skus[(tenant, sku_name)]
        held, bo = counts[(tenant, sku_name)]
        events.append(
            event("adjusted", sku, delta, sku.on_hand - delta, held, bo)
            | {"res": "", "user": "", "reason": "rebuild: on_hand raised to cover the sales PostgreSQL holds"}
        )
    for part in dropped:
        for line in part.lines:
            sku = image.skus[(part.tenant, line.sku)]
            held, bo = counts[(part.tenant, line.sku)]
            if line.held:
                counts[(part.tenant, line.sku)] = [held - line.quantity, bo - line.backordered]
            events.append(
                event("expired" if line.held else "lapsed", sku, line.quantity, sku.on_hand, held, bo)
                | {
                    "res": part.reservation_id,
                    "user": part.user_id,
                    "st": "expired",
                    "lbo": 0,
                    "reason": "rebuild: hold dropped so that held + sold fits on_hand",
                }
            )
    return events


def _available(sku: SkuImage, on_hand: int, held: int, backordered: int, now: int) -> int:
    return available_units(
        on_hand, sku.safety_stock, held, sku.sold, backordered, sku.presale_cap, sku.presale_ends_at, now
    )
