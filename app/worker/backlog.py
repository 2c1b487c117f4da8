"""What is waiting between Redis and PostgreSQL, per shard stream, and how far a stream may be trimmed.

An event is unpersisted while it is pending in a consumer group (delivered, not yet acknowledged) or not
yet delivered to it. Both the metrics (`/metrics`, `stockhold status`) and the worker's trimming read the
same facts: XINFO GROUPS (pending count, last delivered id, lag) and, when entries are pending, XPENDING's
oldest id. A stream is trimmed only below the oldest entry some group still needs, so trimming never
drops an event before it is in PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.stock.keys import KeySpace

# The write-behind worker's consumer group (app/worker/consumer.py): what it acknowledged is in PostgreSQL.
PERSISTING_GROUP = "stockhold-writer"


def _position(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def _after(entry_id: str) -> str:
    ms, seq = _position(entry_id)
    return f"{ms}-{seq + 1}"


@dataclass(frozen=True, slots=True)
class ShardBacklog:
    shard: int
    length: int  # entries in the stream (persisted ones are trimmed away soon after)
    pending: int  # delivered to a worker, not yet acknowledged
    undelivered: int  # not yet read by the write-behind group
    oldest_unpersisted_ms: int | None  # stream id time of the oldest entry some group still needs
    floor: str | None  # the oldest id some group still needs: entries below it may be trimmed

    @property
    def unpersisted(self) -> int:
        return self.pending + self.undelivered

    def oldest_age_s(self, now_ms: int) -> float:
        if self.oldest_unpersisted_ms is None:
            return 0.0
        return max(0.0, (now_ms - self.oldest_unpersisted_ms) / 1000)


async def read_backlog(redis: Redis, keys: KeySpace) -> list[ShardBacklog]:
    """One snapshot of every shard stream (three pipelined rounds, whatever the shard count).

    What waits for PostgreSQL (pending, undelivered, the oldest's age) is the write-behind group's alone:
    other groups (the webhook dispatcher's) say nothing of what is persisted. The trim floor is below
    what every group still needs, and nothing is trimmed while the write-behind group does not exist."""
    shards = list(keys.all_shards())
    async with redis.pipeline(transaction=False) as pipe:
        for shard in shards:
            pipe.xlen(keys.events(shard))
            pipe.xinfo_groups(keys.events(shard))
        replies = await pipe.execute(raise_on_error=False)
    lengths = replies[0::2]
    groups_per_shard: list[list[dict[str, Any]]] = [
        g if not isinstance(g, ResponseError) else [] for g in replies[1::2]
    ]

    # Per group still needing entries: the oldest pending id (XPENDING) or the first undelivered one.
    async with redis.pipeline(transaction=False) as pipe:
        asked: list[tuple[int, str, str]] = []  # (shard, group, what)
        for shard, groups in zip(shards, groups_per_shard, strict=True):
            for group in groups:
                # both, always: by the time XPENDING runs its entries may all be acknowledged (min nil),
                # and the first undelivered entry is then the oldest this group needs
                if int(group["pending"]) > 0:
                    pipe.xpending(keys.events(shard), group["name"])
                    asked.append((shard, str(group["name"]), "pending"))
                start = "(" + str(group["last-delivered-id"])
                pipe.xrange(keys.events(shard), min=start, max="+", count=1)
                asked.append((shard, str(group["name"]), "next"))
        for shard, groups in zip(shards, groups_per_shard, strict=True):
            if not _writers(groups):  # no worker ever read it (none started yet, or Redis lost its groups)
                pipe.xrange(keys.events(shard), min="-", max="+", count=1)
                asked.append((shard, PERSISTING_GROUP, "next"))
        answers = await pipe.execute() if asked else []
    needed: dict[int, list[str]] = {}  # by any group
    unpersisted: dict[int, list[str]] = {}  # by the write-behind group
    for (shard, group_name, kind), answer in zip(asked, answers, strict=True):
        found = None
        if kind == "pending":
            found = str(answer["min"]) if answer["min"] is not None else None
        elif answer:
            found = str(answer[0][0])
        if found is not None:
            needed.setdefault(shard, []).append(found)
            if group_name == PERSISTING_GROUP:
                unpersisted.setdefault(shard, []).append(found)

    result = []
    for shard, length, groups in zip(shards, lengths, groups_per_shard, strict=True):
        writers = _writers(groups)
        oldest = min(unpersisted.get(shard, []), key=_position, default=None)
        floor: str | None = None  # no write-behind group: nothing was persisted, trim nothing
        if writers:
            floor = min(needed.get(shard, []), key=_position, default=None)
            if floor is None:
                # every group is caught up: everything up to the slowest group's last delivered id can go
                floor = _after(min((str(g["last-delivered-id"]) for g in groups), key=_position))
        result.append(
            ShardBacklog(
                shard=shard,
                length=int(length) if not isinstance(length, ResponseError) else 0,
                pending=sum(int(g["pending"]) for g in writers),
                undelivered=_undelivered(writers, length),
                oldest_unpersisted_ms=_position(oldest)[0] if oldest else None,
                floor=floor,
            )
        )
    return result


def _writers(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g for g in groups if str(g["name"]) == PERSISTING_GROUP]


def _undelivered(groups: list[dict[str, Any]], length: Any) -> int:
    total = int(length) if not isinstance(length, ResponseError) else 0
    if not groups:
        return total
    # XINFO GROUPS reports no lag when it cannot tell (entries deleted mid-stream): then every entry
    # not pending is counted, an overestimate by whatever acknowledged entries are not trimmed yet
    return max(int(g["lag"]) if g["lag"] is not None else max(0, total - int(g["pending"])) for g in groups)


async def trim_persisted(redis: Redis, keys: KeySpace, backlog: list[ShardBacklog] | None = None) -> int:
    """Trims every shard stream below what every consumer group has acknowledged. A stream with no
    group is never trimmed (its events have no reader yet). Returns the number of entries removed."""
    backlog = backlog if backlog is not None else await read_backlog(redis, keys)
    targets = [b for b in backlog if b.floor is not None and b.length > 0]
    if not targets:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for b in targets:
            pipe.xtrim(keys.events(b.shard), minid=b.floor, approximate=False)
        removed = await pipe.execute()
    return sum(int(n) for n in removed)
