"""What the live dashboard shows (GET /v1/dashboard, drawn by GET /dashboard): one tenant's SKUs with their
live counters, its holds closest to their deadline, and the write-behind pipeline's lag.

A page polls it every second during a sale, so what one reading costs is bounded in Redis:

- SKUs: those named by the caller (up to MAX_NAMED), or else the tenant's most recently changed ones, at most
  ``limit``: PostgreSQL's ``sku.updated_at``, which the write-behind worker moves with every persisted event,
  the latest of a split SKU's buckets counting for the SKU. That query reads the tenant's whole catalogue
  (12 ms for 20,000 SKUs, measured); naming the SKUs skips it. Their counters come from Redis (one pipelined
  HMGET per SKU and bucket), never from PostgreSQL, which lags by the write-behind delay. A split SKU is
  shown once, as the sum of its buckets; buckets are never listed (they are internal SKUs).
- Holds about to expire: each shard's expiry index read from its earliest deadline, at most
  EXPIRY_SCAN_PER_SHARD entries per shard, of which the tenant's own are kept (one field read per entry; the
  lines of the ``holds`` shown only). When a shard has more due entries than that, the list stops at the
  earliest deadline some shard was not read past (so it is the soonest, with none skipped) and the count is
  a lower bound. The index is shared by the tenants of a deployment: no other tenant's hold is shown or
  counted, but whether the count is a lower bound, and how far the list goes, depend on every tenant's
  holds on the shard (a busy shard, not whose or what).
- Write-behind lag: the deployment's figures that /metrics exports (app/worker/status.py), summed over the
  shards; counts and ages only, no tenant's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from pydantic import BaseModel, Field
from redis.asyncio import Redis

from app.stock.buckets import Split, SplitMap, bucket_sku, parent_sku
from app.stock.clock import now_ms
from app.stock.errors import SkuNotFound
from app.stock.keys import BUCKET_SEPARATOR, KeySpace
from app.stock.schemas import Mode, from_ms
from app.stock.service import SKU_STATE_FIELDS, sku_state_of
from app.worker.status import pipeline_status

DEFAULT_SKUS = 20
MAX_SKUS = 100
MAX_NAMED = 20  # SKUs a caller may name (?sku=...): a sale's few, not a catalogue
DEFAULT_WITHIN_SECONDS = 60
MAX_WITHIN_SECONDS = 3600
DEFAULT_HOLDS = 20
MAX_HOLDS = 100
# Expiry index entries read per shard, each costing one HGET of its tenant: 16 shards x 200 = 3,200 small
# reads at most per poll, however many holds a sale has open. Only the holds shown are read whole.
EXPIRY_SCAN_PER_SHARD = 200

# A split SKU's buckets are rows of their own ("<sku>~<i>"): they count for the SKU, and are never listed.
_RECENT = """
SELECT split_part(sku, $3, 1) AS sku FROM sku
WHERE tenant = $1
GROUP BY 1
ORDER BY max(updated_at) DESC, 1
LIMIT $2
"""


class DashboardSku(BaseModel):
    sku: str
    on_hand: int | None = Field(default=None, description="null while the SKU's shard awaits a rebuild from PostgreSQL")
    held: int | None = None
    sold: int | None = None
    backordered: int | None = None
    available: int | None = Field(
        default=None, description="what a new hold may take, to any channel, presale included"
    )
    mode: Mode | None = None
    buckets: int = Field(description="1, or the K buckets a split SKU is spread over (the figures are their sum)")
    ready: bool


class DashboardLine(BaseModel):
    sku: str
    quantity: int


class ExpiringHold(BaseModel):
    reservation_id: str
    user_id: str
    lines: list[DashboardLine]
    expires_at: datetime
    seconds_left: float = Field(description="0 when past the deadline: the sweeper releases it within moments")


class ExpiringHolds(BaseModel):
    within_seconds: int
    count: int = Field(description="the tenant's holds with a deadline within the window, among those read")
    count_is_lower_bound: bool = Field(description="true when a shard had more entries than one poll reads")
    holds: list[ExpiringHold] = Field(
        description="the soonest first, at most `holds` of them; when the count is a lower bound, only those due"
        " before the earliest deadline a shard was not read past"
    )


class WriteBehind(BaseModel):
    unpersisted_events: int = Field(description="stock events not yet in PostgreSQL, every shard")
    oldest_unpersisted_age_seconds: float = Field(description="the write-behind lag: 0 when nothing waits")
    shards: int
    shards_ready: int


class Dashboard(BaseModel):
    tenant: str
    at: datetime
    at_ms: int
    skus: list[DashboardSku]
    skus_truncated: bool = Field(description="the tenant has more SKUs than `limit`; the most recent are shown")
    expiring: ExpiringHolds
    write_behind: WriteBehind


@dataclass(frozen=True, slots=True)
class DashboardQuery:
    skus: Sequence[str] = ()  # named SKUs; empty: the most recently changed ones
    limit: int = DEFAULT_SKUS
    within_seconds: int = DEFAULT_WITHIN_SECONDS
    holds: int = DEFAULT_HOLDS


class DashboardReader:
    def __init__(self, redis: Redis, pg: asyncpg.Pool, keys: KeySpace, splits: SplitMap) -> None:
        self.redis = redis
        self.pg = pg
        self.keys = keys
        self.splits = splits

    async def read(self, tenant: str, query: DashboardQuery) -> Dashboard:
        now = now_ms()
        truncated = False
        if query.skus:
            names = list(dict.fromkeys(query.skus))
        else:
            rows = await self.pg.fetch(_RECENT, tenant, query.limit + 1, BUCKET_SEPARATOR)
            names = [r["sku"] for r in rows]
            truncated = len(names) > query.limit
            names = names[: query.limit]
        skus = await self._skus(tenant, names)
        if query.skus:
            missing = [s.sku for s in skus if s.ready and s.on_hand is None]
            if missing:
                raise SkuNotFound(f"SKU {missing[0]!r} does not exist", sku=missing[0])
        else:  # listed by PostgreSQL, gone from Redis: never shown as a row of nulls
            skus = [s for s in skus if not (s.ready and s.on_hand is None)]
        return Dashboard(
            tenant=tenant,
            at=from_ms(now),
            at_ms=now,
            skus=skus,
            skus_truncated=truncated,
            expiring=await self._expiring(tenant, query.within_seconds, query.holds, now),
            write_behind=await self._write_behind(),
        )

    async def _skus(self, tenant: str, names: list[str]) -> list[DashboardSku]:
        splits = {name: self.splits.get(tenant, name) for name in names}
        # every bucket's counters and its shard's ready marker, in one pipelined round trip; a lowered K's
        # drained buckets are read too until they are empty (Split.highest)
        reads: list[tuple[str, int]] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                split = splits[name]
                for index in split.all_buckets() if split is not None else range(1):
                    shard = self.keys.shard_of(tenant, bucket_sku(name, index))
                    pipe.exists(self.keys.ready(shard))
                    pipe.hmget(self.keys.sku(shard, tenant, bucket_sku(name, index)), SKU_STATE_FIELDS)
                    reads.append((name, index))
            replies = await pipe.execute()
        per_sku: dict[str, list[tuple[bool, list[str | None]]]] = {name: [] for name in names}
        for (name, _), ready, values in zip(reads, replies[0::2], replies[1::2], strict=True):
            per_sku[name].append((bool(ready), values))
        return [_sku_row(name, _routed(splits[name]), per_sku[name]) for name in names]

    async def _expiring(self, tenant: str, within_seconds: int, limit: int, now: int) -> ExpiringHolds:
        """Three pipelined rounds: the due entries of every shard's index, the tenant of each (one field),
        then the lines of the holds shown."""
        until = now + within_seconds * 1000
        shards = list(self.keys.all_shards())
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrangebyscore(
                    self.keys.expiry(shard), "-inf", until, start=0, num=EXPIRY_SCAN_PER_SHARD, withscores=True
                )
            entries = await pipe.execute()
        cut = [int(e[-1][1]) for e in entries if len(e) >= EXPIRY_SCAN_PER_SHARD]  # where reading stopped
        complete_before = min(cut, default=until + 1)  # every shard was read up to here: nothing due is skipped
        due = [(shard, str(rid), int(at)) for shard, e in zip(shards, entries, strict=True) for rid, at in e]
        owners = await self._fields(due, "t")
        # another tenant's entries, and parts released since the index was read (no tenant field left), go
        deadlines: dict[str, int] = {}  # a reservation spanning shards has a part, and an entry, on each
        for (_, rid, deadline), owner in zip(due, owners, strict=True):
            if owner == tenant:
                deadlines[rid] = min(deadline, deadlines.get(rid, deadline))
        complete = [rid for rid, deadline in deadlines.items() if deadline < complete_before]
        shown = sorted(complete, key=lambda rid: (deadlines[rid], rid))[:limit]
        wanted = set(shown)
        parts = [(shard, rid, deadline) for shard, rid, deadline in due if rid in wanted]
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard, rid, _ in parts:
                pipe.hgetall(self.keys.reservation(shard, rid))
            contents = await pipe.execute() if parts else []
        holds = {
            rid: ExpiringHold(
                reservation_id=rid,
                user_id="",
                lines=[],
                expires_at=from_ms(deadlines[rid]),
                seconds_left=max(0.0, (deadlines[rid] - now) / 1000),
            )
            for rid in shown
        }
        for (_, rid, _), part in zip(parts, contents, strict=True):
            fields = {str(k): str(v) for k, v in part.items()}
            holds[rid].user_id = holds[rid].user_id or fields.get("u", "")
            for field, quantity in fields.items():
                if field.startswith("q:"):
                    _add_line(holds[rid].lines, parent_sku(field[2:]), int(quantity))
        return ExpiringHolds(
            within_seconds=within_seconds,
            count=len(deadlines),
            count_is_lower_bound=bool(cut),
            holds=[holds[rid] for rid in shown],
        )

    async def _fields(self, parts: list[tuple[int, str, int]], field: str) -> list[str | None]:
        if not parts:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard, rid, _ in parts:
                pipe.hget(self.keys.reservation(shard, rid), field)
            values = await pipe.execute()
        return [None if v is None else str(v) for v in values]

    async def _write_behind(self) -> WriteBehind:
        statuses = await pipeline_status(self.redis, None, self.keys)  # Redis alone tells what waits
        return WriteBehind(
            unpersisted_events=sum(s.backlog.unpersisted for s in statuses),
            oldest_unpersisted_age_seconds=round(max((s.oldest_unpersisted_age_s for s in statuses), default=0.0), 3),
            shards=len(statuses),
            shards_ready=sum(1 for s in statuses if s.ready),
        )


def _routed(split: Split | None) -> int:
    return split.buckets if split is not None else 1


def _add_line(lines: list[DashboardLine], sku: str, quantity: int) -> None:
    """A split SKU's line may be held in several buckets: one line per SKU, as the client asked for it."""
    for line in lines:
        if line.sku == sku:
            line.quantity += quantity
            return
    lines.append(DashboardLine(sku=sku, quantity=quantity))


def _sku_row(name: str, buckets: int, reads: list[tuple[bool, list[str | None]]]) -> DashboardSku:
    """One row: the sum of the SKU's buckets, each read as GET /v1/skus reads a SKU (sku_state_of), summed as
    Splitter.state sums them. A bucket on a shard awaiting a rebuild makes the figures unknown (null) rather
    than a partial sum; a SKU that does not exist has null figures on a ready shard."""
    ready = all(ok for ok, _ in reads)
    if not ready or reads[0][1][0] is None:
        return DashboardSku(sku=name, buckets=buckets, ready=ready)
    # a bucket not created yet (a split being made) holds nothing
    states = [sku_state_of(name, values) for _, values in reads if values[0] is not None]
    return DashboardSku(
        sku=name,
        on_hand=sum(s.on_hand for s in states),
        held=sum(s.held for s in states),
        sold=sum(s.sold for s in states),
        backordered=sum(s.backordered for s in states),
        available=sum(s.available_total for s in states),
        mode=states[0].mode,
        buckets=buckets,
        ready=True,
    )
