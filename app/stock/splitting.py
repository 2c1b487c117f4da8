"""Splitting a hot SKU over buckets, moving units between them, and the catalogue calls on a split SKU.

See app/stock/buckets.py for what a bucket is and how reservations are routed. Here:

- ``put_split`` creates the buckets a split needs (as SKUs with the SKU's settings and no units), writes
  the split to PostgreSQL, tells every process (the split version), then rebalances.
- ``rebalance`` spreads the free units (on hand, not held or sold) evenly over the routed buckets and
  drains the buckets a lowered split no longer routes to. Each move is two calls: a shrink of the source
  bucket, then a restock of the target, each atomic on its own shard with its event and an idempotency
  record. A move is written to PostgreSQL (``bucket_move``) before its first call and marked finished after
  its second; an unfinished move (a crash between the two) is finished by the next rebalance, which replays
  both calls under the same idempotency keys, so its units are moved exactly once. Between the two calls
  the units are in neither bucket: the SKU sells less for that moment, never more.
- Catalogue calls on a split SKU keep their meaning for the whole SKU: ``on_hand`` in a PUT is the total
  (the difference is made on bucket 0, whose units are first gathered from the others for a shrink), an
  adjustment or a receipt is made on bucket 0, and the settings (mode, TTL, purchase policy) are copied
  to every bucket. A rebalance follows each.

Calls that change buckets hold the SKU's split lock (redis-py's Lock on the SKU's shard), so two of them
never move the same units twice; reservations take no lock.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
from redis.asyncio.lock import Lock

from app.stock.buckets import Split, SplitMap, bucket_sku
from app.stock.errors import ReservationBusy, SkuNotFound, SplitConflict, StockConflict
from app.stock.idempotency import IdempotencyRequest, fingerprint
from app.stock.schemas import (
    Adjustment,
    BucketState,
    Receipt,
    ReceiptState,
    SkuSettings,
    SkuState,
    SplitState,
)

if TYPE_CHECKING:
    from app.stock.service import StockService

log = logging.getLogger(__name__)

# A split change or a rebalance takes a few script calls per bucket: milliseconds. The lock outlives that
# by far, and frees the SKU soon after a crashed holder; a second caller waits this long for it.
LOCK_SECONDS = 30.0
LOCK_WAIT_SECONDS = 10.0
MOVE_SCOPE = "bucket_move"  # the idempotency scope of a move's two calls (no client can send it)

READ_SPLIT = "SELECT buckets, highest FROM sku_split WHERE tenant = $1 AND sku = $2"
UPSERT_SPLIT = """
INSERT INTO sku_split (tenant, sku, buckets, highest) VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant, sku) DO UPDATE SET buckets = EXCLUDED.buckets, highest = EXCLUDED.highest, updated_at = now()
"""
INSERT_MOVE = """
INSERT INTO bucket_move (id, tenant, sku, from_bucket, to_bucket, units) VALUES ($1, $2, $3, $4, $5, $6)
"""
FINISH_MOVE = "UPDATE bucket_move SET finished_at = now(), outcome = $2 WHERE id = $1"
UNFINISHED_MOVES = """
SELECT id, from_bucket, to_bucket, units, created_at FROM bucket_move
WHERE tenant = $1 AND sku = $2 AND finished_at IS NULL ORDER BY created_at
"""


def even_targets(free: list[int], routed: int) -> list[int]:
    """Each bucket's share of the free units: even over the routed buckets (the first ones get the
    remainder), none for the buckets past them."""
    total = sum(free)
    return [(total // routed + (1 if i < total % routed else 0)) if i < routed else 0 for i in range(len(free))]


def plan_moves(free: list[int], targets: list[int]) -> list[tuple[int, int, int]]:
    """(from, to, units) moves that bring every bucket's free units to its target, fewest moves first:
    the largest surplus fills the largest deficit."""
    surplus = sorted(((f - t, i) for i, (f, t) in enumerate(zip(free, targets, strict=True)) if f > t), reverse=True)
    deficit = sorted(((t - f, i) for i, (f, t) in enumerate(zip(free, targets, strict=True)) if t > f), reverse=True)
    moves: list[tuple[int, int, int]] = []
    si = di = 0
    s_left = surplus[0][0] if surplus else 0
    d_left = deficit[0][0] if deficit else 0
    while si < len(surplus) and di < len(deficit):
        units = min(s_left, d_left)
        moves.append((surplus[si][1], deficit[di][1], units))
        s_left -= units
        d_left -= units
        if s_left == 0:
            si += 1
            s_left = surplus[si][0] if si < len(surplus) else 0
        if d_left == 0:
            di += 1
            d_left = deficit[di][0] if di < len(deficit) else 0
    return moves


def free_units(state: SkuState) -> int:
    """Units on hand that nothing holds or sold: what a move may take from a bucket."""
    return max(0, state.on_hand - state.safety_stock - state.held - state.sold + state.backordered)


class Splitter:
    def __init__(self, service: StockService, pg: asyncpg.Pool, splits: SplitMap, idempotency_ttl_seconds: int) -> None:
        self.service = service
        self.pg = pg
        self.splits = splits
        self.keys = service.keys
        # a move older than this may have lost its idempotency records: replaying it could apply it twice
        self.replay_window = timedelta(seconds=max(60, idempotency_ttl_seconds - 60))

    # -- the split ----------------------------------------------------------------------------------------

    async def read_split(self, tenant: str, sku: str) -> Split:
        row = await self.pg.fetchrow(READ_SPLIT, tenant, sku)
        return Split(1, 1) if row is None else Split(row["buckets"], row["highest"])

    async def put_split(self, tenant: str, sku: str, buckets: int) -> SkuState:
        """Spreads the SKU over ``buckets`` buckets (1: gathers it back into one). The SKU must exist and,
        to be split, have no per-user limit, presale or channels: those count the SKU's stock in one place."""
        if buckets > self.keys.shard_count:
            raise SplitConflict(
                f"this deployment has {self.keys.shard_count} shards; a SKU may be split over at most that many"
                " buckets (each on its own shard)",
                buckets=buckets,
                shard_count=self.keys.shard_count,
            )
        async with self._lock(tenant, sku):
            base = await self.service.get_bucket(tenant, sku)  # SkuNotFound for an unknown SKU
            if buckets > 1:
                refuse_split_of(sku, base)
            current = await self.read_split(tenant, sku)
            for index in range(1, buckets):
                await self._sync_bucket(tenant, sku, index, base)
            split = Split(buckets, max(current.highest, buckets))
            await self.pg.execute(UPSERT_SPLIT, tenant, sku, split.buckets, split.highest)
            self.splits.set_local(tenant, sku, split)
            await self.splits.announce()
            await self._rebalance(tenant, sku, split)
        return await self.state(tenant, sku, split)

    async def _sync_bucket(self, tenant: str, sku: str, index: int, base: SkuState) -> None:
        """Gives bucket ``index`` the SKU's settings (mode, TTL, purchase policy), keeping its own units;
        creates it, with none, if it does not exist yet. Under the split lock: only moves change a
        bucket's on_hand, and they take the lock too."""
        name = bucket_sku(sku, index)
        try:
            on_hand = (await self.service.get_bucket(tenant, name)).on_hand
        except SkuNotFound:
            on_hand = 0
        copied = base.model_dump(include={"mode", "hold_ttl_seconds", "max_per_order", "eligibility", "hold_cooldown"})
        settings = SkuSettings.model_validate({**copied, "on_hand": on_hand, "safety_stock": 0})
        await self.service.put_bucket(tenant, name, settings)

    # -- moving units ---------------------------------------------------------------------------------

    async def rebalance(self, tenant: str, sku: str) -> SkuState:
        """Evens out the free units over the routed buckets and drains the others (see the module doc)."""
        split = self.splits.get(tenant, sku) or await self.read_split(tenant, sku)
        if split.highest <= 1:
            await self.service.get_bucket(tenant, sku)  # SkuNotFound for an unknown SKU
            raise SplitConflict(f"SKU {sku!r} is not split; PUT /v1/skus/{sku}/split first", sku=sku)
        async with self._lock(tenant, sku):
            await self._rebalance(tenant, sku, split)
        return await self.state(tenant, sku, split)

    async def _rebalance(self, tenant: str, sku: str, split: Split) -> None:
        await self._finish_unfinished(tenant, sku)
        states = await self._bucket_states(tenant, sku, split)
        free = [free_units(s) for s in states]
        for source, target, units in plan_moves(free, even_targets(free, split.buckets)):
            await self._move(tenant, sku, source, target, units)

    async def _gather(self, tenant: str, sku: str, split: Split, units: int) -> None:
        """Moves free units from the other buckets into bucket 0 until it has ``units`` free (or all there are)."""
        states = await self._bucket_states(tenant, sku, split)
        need = units - free_units(states[0])
        for index, state in sorted(enumerate(states[1:], 1), key=lambda p: -free_units(p[1])):
            if need <= 0:
                break
            take = min(need, free_units(state))
            if take > 0 and await self._move(tenant, sku, index, 0, take):
                need -= take

    async def _move(self, tenant: str, sku: str, source: int, target: int, units: int) -> bool:
        """Moves ``units`` free units from bucket ``source`` to bucket ``target``; False when the source
        no longer had them (a reservation took them meanwhile): then nothing moved."""
        move_id = f"mv_{uuid.uuid4().hex}"
        await self.pg.execute(INSERT_MOVE, move_id, tenant, sku, source, target, units)
        return await self._run_move(tenant, sku, move_id, source, target, units)

    async def _run_move(self, tenant: str, sku: str, move_id: str, source: int, target: int, units: int) -> bool:
        reason = f"{move_id}: bucket {source} -> bucket {target}"
        try:
            await self._adjust_step(tenant, sku, move_id, "out", source, -units, reason)
        except StockConflict:
            await self.pg.execute(FINISH_MOVE, move_id, "refused")
            return False
        await self._adjust_step(tenant, sku, move_id, "in", target, units, reason)
        await self.pg.execute(FINISH_MOVE, move_id, "moved")
        return True

    async def _adjust_step(
        self, tenant: str, sku: str, move_id: str, step: str, bucket: int, delta: int, reason: str
    ) -> None:
        body = Adjustment(delta=delta, reason=reason)
        idem = IdempotencyRequest(
            key=f"{move_id}:{step}", scope=MOVE_SCOPE, fingerprint=fingerprint(MOVE_SCOPE, body.model_dump())
        )
        await self.service.adjust_bucket(tenant, bucket_sku(sku, bucket), body, idem)

    async def _finish_unfinished(self, tenant: str, sku: str) -> None:
        """Finishes the moves a crash interrupted, replaying both calls under their idempotency keys."""
        for row in await self.pg.fetch(UNFINISHED_MOVES, tenant, sku):
            if datetime.now(UTC) - row["created_at"] > self.replay_window:
                # its idempotency records may be gone: a replay could shrink the source twice
                log.error("bucket move %s of %s/%s: too old to replay safely; check by hand", row["id"], tenant, sku)
                await self.pg.execute(FINISH_MOVE, row["id"], "unknown")
                continue
            await self._run_move(tenant, sku, row["id"], row["from_bucket"], row["to_bucket"], row["units"])

    # -- catalogue calls on a split SKU ---------------------------------------------------------------

    async def put_sku(
        self, tenant: str, sku: str, split: Split, settings: SkuSettings, idem: IdempotencyRequest | None
    ) -> SkuState:
        """A PUT of a split SKU: ``on_hand`` is the total over the buckets; the difference is made on
        bucket 0 (a shrink first gathers the units there), the settings are copied to every bucket."""
        refuse_split_settings(sku, settings)
        async with self._lock(tenant, sku):
            states = await self._bucket_states(tenant, sku, split)
            delta = settings.on_hand - sum(s.on_hand for s in states)
            if delta < 0:
                await self._gather(tenant, sku, split, -delta)
                states[0] = await self.service.get_bucket(tenant, sku)
            base = settings.model_copy(update={"on_hand": max(0, states[0].on_hand + delta)})
            if states[0].on_hand + delta < 0:
                raise StockConflict(
                    f"SKU {sku!r} has {sum(s.on_hand for s in states)} units on hand over its buckets, more held"
                    f" and sold than on_hand {settings.on_hand} allows",
                    held=sum(s.held for s in states),
                    sold=sum(s.sold for s in states),
                    field="on_hand",
                )
            state, _ = await self.service.put_bucket(tenant, sku, base, idem)
            for index in range(1, split.highest):
                await self._sync_bucket(tenant, sku, index, state)
            await self._rebalance(tenant, sku, split)
        return await self.state(tenant, sku, split)

    async def adjust(
        self, tenant: str, sku: str, split: Split, adjustment: Adjustment, idem: IdempotencyRequest | None
    ) -> SkuState:
        """A restock or shrink of a split SKU, made on bucket 0 (a shrink first gathers the units there)."""
        async with self._lock(tenant, sku):
            if adjustment.delta < 0:
                await self._gather(tenant, sku, split, -adjustment.delta)
            try:
                await self.service.adjust_bucket(tenant, sku, adjustment, idem)
            except StockConflict as exc:
                states = await self._bucket_states(tenant, sku, split)
                raise StockConflict(
                    f"SKU {sku!r} has {sum(free_units(s) for s in states)} free units over its buckets; the shrink"
                    f" of {-adjustment.delta} would go below what is held and sold",
                    held=sum(s.held for s in states),
                    sold=sum(s.sold for s in states),
                    field="on_hand",
                ) from exc
            await self._rebalance(tenant, sku, split)
        return await self.state(tenant, sku, split)

    async def receive(
        self, tenant: str, sku: str, split: Split, receipt: Receipt, idem: IdempotencyRequest | None
    ) -> ReceiptState:
        """A receipt on a split SKU (which has no presale, so no backorders): a restock of bucket 0."""
        async with self._lock(tenant, sku):
            booked = await self.service.receive_bucket(tenant, sku, receipt, idem)
            await self._rebalance(tenant, sku, split)
        state = await self.state(tenant, sku, split)
        return ReceiptState(**state.model_dump(), filled=booked.filled, filled_lines=booked.filled_lines)

    # -- reading --------------------------------------------------------------------------------------

    async def _bucket_states(self, tenant: str, sku: str, split: Split) -> list[SkuState]:
        return list(
            await asyncio.gather(*(self.service.get_bucket(tenant, bucket_sku(sku, i)) for i in split.all_buckets()))
        )

    async def state(self, tenant: str, sku: str, split: Split, channel: str | None = None) -> SkuState:
        """The SKU as the sum of its buckets (settings from bucket 0), each bucket listed."""
        states = await self._bucket_states(tenant, sku, split)
        base = states[0]
        available = sum(s.available_total for s in states)
        return base.model_copy(
            update={
                "on_hand": sum(s.on_hand for s in states),
                "held": sum(s.held for s in states),
                "sold": sum(s.sold for s in states),
                "available": available,
                "available_total": available,
                "channel": channel,
                "split": SplitState(
                    buckets=split.buckets,
                    per_bucket=[
                        BucketState(
                            bucket=i,
                            shard=self.keys.shard_of(tenant, bucket_sku(sku, i)),
                            on_hand=s.on_hand,
                            held=s.held,
                            sold=s.sold,
                            available=s.available_total,
                            routed=i < split.buckets,
                        )
                        for i, s in enumerate(states)
                    ],
                ),
            }
        )

    @asynccontextmanager
    async def _lock(self, tenant: str, sku: str) -> AsyncIterator[None]:
        shard = self.keys.shard_of(tenant, sku)
        lock = Lock(
            self.service.redis,
            self.keys.split_lock(shard, tenant, sku),
            timeout=LOCK_SECONDS,
            blocking_timeout=LOCK_WAIT_SECONDS,
        )
        if not await lock.acquire():
            raise ReservationBusy(f"another change to the buckets of SKU {sku!r} is running; retry")
        try:
            yield
        finally:
            try:
                await lock.release()
            except Exception:  # the lock lapsed: the next holder owns the key now
                log.warning("split lock of %s/%s lapsed before release", tenant, sku)


def refuse_split_of(sku: str, state: SkuState) -> None:
    """A SKU whose stock must be counted in one place cannot be split."""
    if state.per_user_limit is not None:
        raise SplitConflict(
            f"SKU {sku!r} has a per_user_limit, which counts a user's units in one place; remove it to split",
            field="per_user_limit",
        )
    if state.presale is not None:
        raise SplitConflict(f"SKU {sku!r} has a presale; a split SKU cannot sell on backorder", field="presale")
    if state.channels:
        raise SplitConflict(f"SKU {sku!r} has sales channels; their quotas cannot be split", field="channels")


def refuse_split_settings(sku: str, settings: SkuSettings) -> None:
    if settings.per_user_limit is not None:
        raise SplitConflict(
            f"SKU {sku!r} is split over buckets; a per_user_limit needs its stock in one place (unsplit first)",
            field="per_user_limit",
        )
    if settings.presale is not None:
        raise SplitConflict(f"SKU {sku!r} is split over buckets; it cannot sell on backorder", field="presale")
