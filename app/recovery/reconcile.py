"""Compares Redis with PostgreSQL per SKU: the counters and settings Redis serves, and its presale's
backorder queue (which reservations a receipt fills, in which order), against the ones a rebuild from
PostgreSQL would give (app/recovery/image.py).

Both sides are compared at the same point of each shard's event stream, so neither write-behind lag nor
live traffic shows as drift. Per shard, Redis's SKU counters and the stream's last event id are read in
one MULTI/EXEC (a snapshot); then the events up to it are persisted; then a SKU is compared only
if PostgreSQL's row for it reflects no event after the snapshot. PostgreSQL then holds exactly the events
up to the snapshot for that SKU, and any difference is drift. A SKU that changed after the snapshot is
compared again in the next of `rounds` rounds; one that changes in every round is not reported (a
hold expiring or a sale made while reconcile ran is traffic, not drift).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from app.recovery.image import ShardImage, SkuImage, load_images
from app.recovery.rebuild import Rebuilder
from app.stock.keys import KeySpace
from app.stock.policy import POLICY_FIELDS
from app.stock.presale import PRESALE_FIELDS
from app.store.cluster import with_server_time

FIELDS = (
    "on_hand",
    "safety_stock",
    "held",
    "sold",
    "mode",
    "hold_ttl_seconds",
    "per_user_limit",
    *POLICY_FIELDS,
    "backordered",
    *PRESALE_FIELDS,
    "channels",
)
QUEUE_FIELD = "backorder_queue"  # compared apart from FIELDS: the queue is a ZSET of its own, not the SKU's hash
# Fields a SKU written before they existed lacks in Redis: absent reads as 0, as the scripts read it.
_ZERO_WHEN_ABSENT = frozenset({*POLICY_FIELDS, "backordered", *PRESALE_FIELDS, "channels"})


@dataclass(frozen=True, slots=True)
class Drift:
    shard: int
    tenant: str
    sku: str
    field: str
    redis: str  # "-" when the SKU is missing on that side
    postgres: str


def _values(image: SkuImage | None) -> dict[str, str]:
    """The fields a SKU should have in Redis: FIELDS, then its channels' as `channels q:<c>` etc."""
    if image is None:
        return {}
    values = {f: str(getattr(image, f)) for f in FIELDS if f not in POLICY_FIELDS and f != "channels"}
    values["channels"] = str(len(image.channels))
    for name, channel in image.channels.items():
        values |= {f"channels {f}": str(v) for f, v in channel.fields(name).items()}
    return values | {f: str(image.policy.get(f, 0)) for f in POLICY_FIELDS}


Position = tuple[int, int]  # a stream entry id "<ms>-<seq>" as numbers


Queue = list[tuple[str, int]]  # a backorder queue: (reservation id, ms it went on backorder), oldest first


def _queue_drift(have: Queue, want: Queue) -> tuple[str, str] | None:
    """Where two queues part (None when they do not): each side's length and entry at the first difference,
    so a long queue is reported in one line."""
    if have == want:
        return None
    i = next((i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b), min(len(have), len(want)))

    def side(queue: Queue) -> str:
        at = f"{queue[i][0]}@{queue[i][1]}" if i < len(queue) else "-"
        return f"{len(queue)} entries, #{i + 1}: {at}"

    return side(have), side(want)


async def _redis_snapshot(
    redis: Redis, keys: KeySpace, shard: int
) -> tuple[dict[tuple[str, str], dict[str, str]], dict[tuple[str, str], Queue], Position]:
    """The shard's SKUs as Redis serves them and the position of its newest event, read atomically.
    A shard with no stream yet: the snapshot's time, so any event made after it counts as later."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    queues: dict[tuple[str, str], Queue] = {}
    prefix = keys.sku(shard, "", "")[: -len(":")]  # "sh:{s}:sku:" without the separator
    names = [k async for k in redis.scan_iter(match=keys.sku(shard, "*", "*"), count=1000)]
    # The shard's clock, read just before the snapshot (inside MULTI a cluster cannot route a keyless TIME):
    # earlier is the safe side, as it can only make more of PostgreSQL count as later than the snapshot.
    _, (seconds, micros) = await with_server_time(redis, keys.events(shard), ["EXISTS", keys.events(shard)])
    async with redis.pipeline(transaction=True) as pipe:  # MULTI/EXEC: one instant of the shard
        for name in names:
            tenant, _, sku = name[len(prefix) :].partition(":")
            pipe.hmget(name, list(FIELDS))
            pipe.hgetall(keys.channels(shard, tenant, sku))
            pipe.zrange(keys.backorder_queue(shard, tenant, sku), 0, -1, withscores=True)
        pipe.xinfo_stream(keys.events(shard))
        *rows, stream = await pipe.execute(raise_on_error=False)
    for name, row, channels, queue in zip(names, rows[0::3], rows[1::3], rows[2::3], strict=True):
        tenant, _, sku = name[len(prefix) :].partition(":")
        if not isinstance(row, Exception) and row[0] is not None:  # a SKU deleted meanwhile is skipped
            # a policy or presale field absent from the hash is off, as PostgreSQL's 0 says
            found[(tenant, sku)] = {
                f: "0" if v is None and f in _ZERO_WHEN_ABSENT else str(v) for f, v in zip(FIELDS, row, strict=True)
            }
            found[(tenant, sku)] |= {f"channels {f}": str(v) for f, v in channels.items()}
            if queue and not isinstance(queue, Exception):
                queues[(tenant, sku)] = [(str(rid), int(score)) for rid, score in queue]
    if isinstance(stream, Exception):  # no such key: no event in flight
        return found, queues, (int(seconds) * 1000 + int(micros) // 1000, -1)
    ms, _, seq = str(stream["last-generated-id"]).partition("-")
    return found, queues, (int(ms), int(seq))


async def _postgres_positions(pg: asyncpg.Pool) -> dict[tuple[str, str], Position]:
    """Per SKU, the stream position of the newest event its PostgreSQL rows reflect."""
    rows = await pg.fetch("SELECT tenant, sku, event_ms, event_seq FROM sku")
    return {(r["tenant"], r["sku"]): (r["event_ms"], r["event_seq"]) for r in rows}


async def compare(redis: Redis, pg: asyncpg.Pool, keys: KeySpace, rounds: int = 3) -> list[Drift]:
    rebuilder = Rebuilder(redis, pg, keys)
    shards = list(keys.all_shards())
    drift: list[Drift] = []
    compared: set[tuple[str, str]] = set()
    for attempt in range(rounds):
        if attempt:
            await asyncio.sleep(0.2)
        snapshots = {shard: await _redis_snapshot(redis, keys, shard) for shard in shards}
        # up to the snapshot: what came later is not compared this round, and a busy stream has no end
        until = {shard: f"{ms}-{seq}" for shard, (_, _, (ms, seq)) in snapshots.items() if seq >= 0}
        await rebuilder.drain([shard for shard in shards if shard in until], until)
        images = await load_images(pg, keys, shards)
        positions = await _postgres_positions(pg)
        changed = False
        for shard in shards:
            live, live_queues, at = snapshots[shard]
            expected = images[shard].skus
            expected_queues = images[shard].backorder_queues()
            for key in sorted(set(live) | set(expected)):
                if key in compared:
                    continue
                if positions.get(key, (0, 0)) > at:  # PostgreSQL is past the snapshot: next round
                    changed = True
                    continue
                compared.add(key)
                have, want = live.get(key, {}), _values(expected.get(key))
                drift += [
                    Drift(shard, key[0], key[1], f, have.get(f, "-"), want.get(f, "-"))
                    for f in [*FIELDS, *sorted((set(have) | set(want)) - set(FIELDS))]
                    if have.get(f, "-") != want.get(f, "-")
                ]
                queue = sorted(expected_queues.get(key, {}).items(), key=lambda entry: (entry[1], entry[0]))
                if (parted := _queue_drift(live_queues.get(key, []), queue)) is not None:
                    drift.append(Drift(shard, key[0], key[1], QUEUE_FIELD, *parted))
        if not changed:
            break
    drift += await _listing_drift(redis, keys, shards, images)
    return sorted(drift, key=lambda d: (d.shard, d.tenant, d.sku, d.field))


async def _listing_drift(redis: Redis, keys: KeySpace, shards: list[int], images: dict[int, ShardImage]) -> list[Drift]:
    """Listings (field "components", the listing's id in `sku`): Redis's copy against PostgreSQL's. They
    are not events, so there is no stream position to wait for: a PUT writes PostgreSQL, then Redis."""
    drift: list[Drift] = []
    for shard in shards:
        prefix = keys.listing(shard, "", "")[: -len(":")]
        names = [k async for k in redis.scan_iter(match=keys.listing(shard, "*", "*"), count=1000)]
        values = await redis.mget(names) if names else []
        live = {}
        for name, value in zip(names, values, strict=True):
            tenant, _, listing = name[len(prefix) :].partition(":")
            live[(tenant, listing)] = str(value)
        want = images[shard].listings
        for key in sorted(set(live) | set(want)):
            if live.get(key) != want.get(key):
                drift.append(Drift(shard, key[0], key[1], "components", live.get(key, "-"), want.get(key, "-")))
    return drift
