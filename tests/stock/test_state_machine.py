"""Random sequences of stock operations against an in-memory model of the documented semantics.

A hypothesis state machine drives the real StockService and ExpirySweeper (real Redis, real Lua) with
reserve / confirm / release / adjust / expire / put_sku steps on four SKUs spread over three shards (so
reservations span shards and their compensation runs), three users, quantities 1-3 and stock 0-6. After
every step the real counters, per-user units and reservation statuses must equal the model's, and
invariant 1 (held + sold <= on_hand - safety_stock, available >= 0) must hold on the real state.

The model knows nothing of shards, scripts or compensation: it is the contract of DESIGN.md written as
plain Python. A reservation has one status and at most one deadline (the shortest hold_ttl_seconds of its
pre_reserve lines at reserve time); when it expires, every held line goes back, on_order ones included.
Per-user units (held + bought) are read from the per-user hash of DESIGN.md's key layout.

Time is explicit: holds last 600 s or 7200 s of wall-clock time, far longer than a run, and expire only when
the `expire` step sweeps at a future instant (1 h ahead: the 600 s holds are due; about 11 days ahead: every
hold is due).

PostgreSQL is the system of record, so at the end of every run (teardown) the write-behind worker drains the
shard streams into it, and then (a) replaying the stock_movement ledger must give exactly Redis's counters and
per-user units, and (b) the image a rebuild would load from PostgreSQL must equal Redis's stock state. The
machine owns the ledger tables during a run: it empties them when it starts.
"""

from __future__ import annotations

import asyncio
import sys
import zlib
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import hypothesis
import orjson
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from app.config import Settings
from app.recovery.image import PartImage, ShardImage, load_images
from app.recovery.rebuild import _part_fields
from app.stock.clock import now_ms
from app.stock.errors import SkuNotFound, StockConflict, StockError
from app.stock.events import EFFECTS, StreamEvent
from app.stock.keys import KeySpace
from app.stock.schemas import (
    Adjustment,
    Mode,
    Reservation,
    ReservationItem,
    ReservationRequest,
    SkuSettings,
    SkuState,
)
from app.stock.service import StockService
from app.stock.sweeper import ExpirySweeper
from app.store.postgres import create_pool
from app.store.redis import connect_redis
from app.store.scripts import Scripts
from app.worker.consumer import GROUP, WriteBehindWorker
from app.worker.ledger import PostgresLedger
from tests.conftest import STATE_TABLES
from tests.helpers import mark_ready

T = TypeVar("T")

TENANT = "default"
SHARDS = 16
USERS = ("ann", "bob", "cyd")
SKUS = ("apple", "kiwi", "pear", "lime")  # shards 7, 7, 6, 14: two SKUs share a shard, three shards in all
GHOST = "ghost"  # never created; shard 6, beside pear
SHORT_TTL, LONG_TTL = 600, 7_200
SOON, LATER = 3_600, 1_000_000  # sweep horizons (s): SOON expires only SHORT_TTL holds, LATER every hold

HELD, PENDING, CONFIRMED, RELEASED, EXPIRED = "held", "pending", "confirmed", "released", "expired"


def shard_of(sku: str) -> int:
    """DESIGN.md's mapping, computed independently of KeySpace."""
    return zlib.crc32(f"{TENANT}:{sku}".encode()) % SHARDS


# -- the model ----------------------------------------------------------------------------------------


@dataclass
class SkuModel:
    on_hand: int
    safety: int
    mode: Mode
    ttl: int
    limit: int | None
    held: int = 0
    sold: int = 0

    @property
    def available(self) -> int:
        return self.on_hand - self.safety - self.held - self.sold


@dataclass
class LineModel:
    sku: str
    qty: int
    held: bool  # its SKU was not on_payment at reserve time, so the units were held


@dataclass
class ReservationModel:
    user: str
    lines: list[LineModel]
    status: str
    ttl: int | None  # shortest hold_ttl_seconds of its pre_reserve lines; None: no deadline


# Expected refusals: code -> details the error must agree with.
#   sku_not_found: {sku: None}; limit_exceeded: {sku: (limit, units, requested)};
#   insufficient_stock: {sku: (available, requested)}; reservation_*: {}
Refusals = dict[str, dict[str, Any]]


class Model:
    def __init__(self) -> None:
        self.skus: dict[str, SkuModel] = {}
        self.units: dict[tuple[str, str], int] = {}  # (user, sku) -> units held + bought
        self.reservations: dict[str, ReservationModel] = {}

    def add_units(self, user: str, sku: str, delta: int) -> None:
        self.units[(user, sku)] = self.units.get((user, sku), 0) + delta
        assert self.units[(user, sku)] >= 0, "model bug: negative per-user units"

    def stock_refusals(self, user: str, lines: list[tuple[str, int]]) -> Refusals:
        """Why taking `lines` from available stock now must be refused (empty: it must be granted)."""
        missing = {sku: None for sku, _ in lines if sku not in self.skus}
        if missing:
            return {"sku_not_found": missing}
        refusals: Refusals = {}
        for sku, qty in lines:
            s = self.skus[sku]
            units = self.units.get((user, sku), 0)
            if s.limit is not None and units + qty > s.limit:
                refusals.setdefault("limit_exceeded", {})[sku] = (s.limit, units, qty)
            if qty > s.available:
                refusals.setdefault("insufficient_stock", {})[sku] = (s.available, qty)
        return refusals

    def reserve(self, rid: str, user: str, items: list[tuple[str, int]]) -> ReservationModel:
        lines = [LineModel(sku, qty, self.skus[sku].mode != Mode.ON_PAYMENT) for sku, qty in items]
        ttls = [self.skus[sku].ttl for sku, _ in items if self.skus[sku].mode == Mode.PRE_RESERVE]
        for line in lines:
            if line.held:
                self.skus[line.sku].held += line.qty
                self.add_units(user, line.sku, line.qty)
        status = HELD if any(line.held for line in lines) else PENDING
        res = ReservationModel(user, lines, status, min(ttls) if ttls else None)
        self.reservations[rid] = res
        return res

    def confirm_refusals(self, res: ReservationModel) -> Refusals:
        if res.status == CONFIRMED:
            return {}
        if res.status == RELEASED:
            return {"reservation_released": {}}
        # A live hold keeps its held lines; everything else needs stock available right now.
        direct = [(line.sku, line.qty) for line in res.lines if not (res.status == HELD and line.held)]
        return self.stock_refusals(res.user, direct)

    def confirm(self, res: ReservationModel) -> None:
        if res.status == CONFIRMED:
            return
        for line in res.lines:
            s = self.skus[line.sku]
            if res.status == HELD and line.held:
                s.held -= line.qty
            else:
                self.add_units(res.user, line.sku, line.qty)
            s.sold += line.qty
        res.status = CONFIRMED

    def release_refusals(self, res: ReservationModel) -> Refusals:
        return {"reservation_confirmed": {}} if res.status == CONFIRMED else {}

    def give_back(self, res: ReservationModel, status: str) -> None:
        for line in res.lines:
            if line.held:
                self.skus[line.sku].held -= line.qty
                self.add_units(res.user, line.sku, -line.qty)
        res.status = status

    def release(self, res: ReservationModel) -> None:
        if res.status in (HELD, PENDING):
            self.give_back(res, RELEASED)
        # released / expired: idempotent, nothing changes

    def due(self, horizon_s: int) -> list[ReservationModel]:
        return [r for r in self.reservations.values() if r.status == HELD and r.ttl is not None and r.ttl < horizon_s]


# -- the system of record -----------------------------------------------------------------------------


@dataclass
class ShardState:
    """One shard's stock keys in Redis (found by KeySpace's key prefixes) and its stream's length."""

    skus: dict[str, dict[str, str]] = field(default_factory=dict)  # sku -> its SKU hash
    users: dict[str, dict[str, int]] = field(default_factory=dict)  # sku -> user -> units held + bought
    parts: dict[str, dict[str, str]] = field(default_factory=dict)  # reservation id -> its part hash
    expiry: dict[str, int] = field(default_factory=dict)  # reservation id -> deadline (ms)
    events_added: int = 0  # entries ever added to the shard's stream


async def read_shards(redis: Redis, keys: KeySpace) -> dict[int, ShardState]:
    """Every shard's stock keys: a SCAN per shard, then one pipeline reading them all. Called after
    drain_streams, which created every shard's stream."""
    names = [[key async for key in redis.scan_iter(match=keys.shard_pattern(s), count=1000)] for s in keys.all_shards()]
    layout: list[tuple[int, str, str]] = []  # (shard, prefix, key) of each hash read, in pipeline order
    async with redis.pipeline(transaction=False) as pipe:
        for shard, shard_keys in zip(keys.all_shards(), names, strict=True):
            prefixes = (keys.sku(shard, TENANT, ""), keys.user_counts(shard, TENANT, ""), keys.reservation(shard, ""))
            for key in shard_keys:
                for prefix in prefixes:
                    if key.startswith(prefix):
                        layout.append((shard, prefix, key))
                        pipe.hgetall(key)
        for shard in keys.all_shards():
            pipe.zrange(keys.expiry(shard), 0, -1, withscores=True)
            pipe.xinfo_stream(keys.events(shard))
        replies = await pipe.execute()
    hashes, tail = replies[: len(layout)], replies[len(layout) :]
    shards = {shard: ShardState() for shard in keys.all_shards()}
    for (shard, prefix, key), fields in zip(layout, hashes, strict=True):
        state, name = shards[shard], key.removeprefix(prefix)
        if prefix == keys.sku(shard, TENANT, ""):
            state.skus[name] = fields
        elif prefix == keys.user_counts(shard, TENANT, ""):
            state.users[name] = {user: int(units) for user, units in fields.items()}
        else:
            state.parts[name] = fields
    for shard, scores, stream in zip(keys.all_shards(), tail[::2], tail[1::2], strict=True):
        shards[shard].expiry = {rid: int(deadline) for rid, deadline in scores}
        shards[shard].events_added = stream["entries-added"]
    return shards


async def drain_streams(redis: Redis, keys: KeySpace, worker: WriteBehindWorker) -> None:
    """Persists every event the shard streams hold through the write-behind worker, as it runs in production:
    ensure_groups, then step() until the group has been handed every entry and has acknowledged it.

    (Stepping until step() returns 0 would do too, but that last, idle step blocks until its timeout, which
    the server enforces at its `hz` resolution: about 100 ms at the default, on every example.)"""
    await worker.ensure_groups()
    for _ in range(1_000):  # bounded: a run emits a few hundred events, which drain in a step or two
        if not await undrained(redis, keys):
            return
        assert await worker.step() > 0, "the group has entries to deliver, yet a worker step handled none"
    raise AssertionError(f"the write-behind worker did not drain the shard streams: {await undrained(redis, keys)}")


async def undrained(redis: Redis, keys: KeySpace) -> dict[int, tuple[str, str, int]]:
    """Shards whose consumer group has not been handed every entry of the stream, or has some unacknowledged:
    shard -> (last entry id, last id delivered to the group, entries pending)."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard in keys.all_shards():
            pipe.xinfo_stream(keys.events(shard))
            pipe.xinfo_groups(keys.events(shard))
        replies = await pipe.execute()
    behind: dict[int, tuple[str, str, int]] = {}
    for shard, stream, groups in zip(keys.all_shards(), replies[::2], replies[1::2], strict=True):
        (group,) = [g for g in groups if g["name"] == GROUP]
        last, delivered, pending = stream["last-generated-id"], group["last-delivered-id"], group["pending"]
        if delivered != last or pending:
            behind[shard] = (last, delivered, pending)
    return behind


def part_fields(part: PartImage, image: ShardImage) -> dict[str, Any]:
    """The fields a rebuild writes for a reservation part (app/recovery/rebuild.py), as Redis returns them;
    the document parsed, since PostgreSQL keeps it as jsonb and may spell it differently."""
    fields = {k: str(v) for k, v in _part_fields(part, image).items()}
    if "doc" in fields:
        fields["doc"] = orjson.loads(fields["doc"])
    return fields


def redis_part_fields(part: dict[str, str]) -> dict[str, Any]:
    """A part hash as Redis holds it, minus `ce` (the stream ids of its confirm's events: a cache for
    confirm's ALREADY reply that a rebuild does not restore, the stream not being stock state)."""
    fields: dict[str, Any] = {k: v for k, v in part.items() if k != "ce"}
    if "doc" in fields:
        fields["doc"] = orjson.loads(fields["doc"])
    return fields


# -- the machine --------------------------------------------------------------------------------------

sku_settings = st.builds(
    SkuSettings,
    on_hand=st.integers(0, 6),
    safety_stock=st.integers(0, 1),
    mode=st.sampled_from(list(Mode)),
    hold_ttl_seconds=st.sampled_from([SHORT_TTL, LONG_TTL]),
    per_user_limit=st.none() | st.integers(1, 4),
)
new_sku_settings = sku_settings.filter(lambda s: s.safety_stock <= s.on_hand)
users = st.sampled_from(USERS)
items_strategy = st.lists(
    st.tuples(st.sampled_from(SKUS), st.integers(1, 3)), min_size=1, max_size=3, unique_by=lambda line: line[0]
)


def note(label: str) -> None:
    """Coverage statistics for --hypothesis-show-statistics; a no-op when a test calls the rules directly."""
    if currently_in_test_context():
        event(label)


def spread(lines: list[tuple[str, int]] | list[LineModel]) -> str:
    """Labels a reservation for the coverage statistics (--hypothesis-show-statistics)."""
    skus = [line.sku if isinstance(line, LineModel) else line[0] for line in lines]
    shards = len({shard_of(sku) for sku in skus})
    return "1 shard" if shards == 1 else f"{shards} shards"


def request(user: str, items: list[tuple[str, int]]) -> ReservationRequest:
    return ReservationRequest(user_id=user, items=[ReservationItem(sku=s, quantity=q) for s, q in items])


class StockMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self, redis_url: str, database_url: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis = connect_redis(redis_url, pool_size=16)
        self.pg = self.run(create_pool(database_url, max_size=2))
        # The machine owns the database during a run: the ledger must hold this run's events only, or
        # replaying it could not give this run's counters. DELETE rather than TRUNCATE: the same for these
        # tables (no sequences, foreign keys or triggers) and a run leaves only a few hundred rows, but
        # TRUNCATE gives every table new files, ~30 ms per example here, ~2 s per test run.
        self.run(self.pg.execute("; ".join(f"DELETE FROM {table}" for table in STATE_TABLES)))
        self.keys = KeySpace(SHARDS)
        scripts = Scripts(self.redis)
        self.run(self.redis.flushdb())
        self.run(mark_ready(self.redis, self.keys))
        self.run(scripts.load())
        self.service = StockService(
            self.redis, scripts, self.keys, PostgresLedger(self.pg), idempotency_ttl_seconds=3600
        )
        self.sweeper = ExpirySweeper(self.redis, scripts, self.keys, interval_ms=100, batch=50)
        self.model = Model()

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    def teardown(self) -> None:
        async def close() -> None:
            await self.pg.close()
            await self.redis.aclose()
            await self.redis.connection_pool.disconnect()

        try:
            # Hypothesis calls teardown in a `finally` after the last step, and an assertion raised here
            # fails the example (and is shrunk) like one raised by a rule. When a step already failed, that
            # failure is in flight (sys.exc_info() sees it from this `finally`): the check is skipped so it
            # does not replace the failure to report.
            if sys.exc_info()[1] is None:
                self.run(self.check_system_of_record())
        finally:
            try:
                self.run(close())
            finally:
                self.loop.close()

    # -- checks ---------------------------------------------------------------------------------------

    async def check_system_of_record(self) -> None:
        """After the run: PostgreSQL, once the worker drained every shard stream into it, holds exactly
        Redis's state, whether read as a ledger (replayed) or as the image a rebuild would load."""
        worker = WriteBehindWorker(self.redis, self.pg, self.keys, consumer="machine", block_ms=1)
        await drain_streams(self.redis, self.keys, worker)
        real = await read_shards(self.redis, self.keys)
        await self.check_ledger_replays_to_redis(real)
        await self.check_rebuild_image_equals_redis(real)

    async def check_ledger_replays_to_redis(self, real: dict[int, ShardState]) -> None:
        rows = await self.pg.fetch(
            "SELECT shard, event_id, tenant, sku, kind, quantity, user_id, on_hand_after, held_after, sold_after "
            "FROM stock_movement"
        )
        emitted = sum(state.events_added for state in real.values())
        assert len(rows) == emitted, f"the ledger has {len(rows)} movements, the shard streams emitted {emitted}"
        # Event ids are "<ms>-<seq>": ordered within their shard only, and not as text ("9-0" > "10-0").
        rows.sort(key=lambda r: (r["shard"], StreamEvent(r["shard"], r["event_id"], {}).position))
        counters: dict[tuple[int, str], list[int]] = {}  # (shard, sku) -> [on_hand, held, sold]
        units: dict[tuple[int, str], dict[str, int]] = {}  # (shard, sku) -> user -> units
        for row in rows:
            assert row["tenant"] == TENANT, row
            sku = (row["shard"], row["sku"])
            replayed = counters.setdefault(sku, [0, 0, 0])
            if row["kind"] == "sku_set":  # absolute: on_hand := on_hand (held and sold stay)
                replayed[0] = row["on_hand_after"]
            else:
                assert row["kind"] in EFFECTS, f"event type {row['kind']} has no entry in EFFECTS"
                *deltas, user_delta = EFFECTS[row["kind"]]
                for i, factor in enumerate(deltas):
                    replayed[i] += factor * row["quantity"]
                if user_delta:
                    per_user = units.setdefault(sku, {})
                    per_user[row["user_id"]] = per_user.get(row["user_id"], 0) + user_delta * row["quantity"]
            # Every event carries the SKU's counters after its change, so the replay must agree event by
            # event: on a mismatch this names the first event where the ledger and Redis part ways.
            after = [row["on_hand_after"], row["held_after"], row["sold_after"]]
            assert replayed == after, (
                f"replaying up to {row['kind']} {row['event_id']} of {sku} gives (on_hand, held, sold) "
                f"{replayed}, the event says {after}"
            )
        real_counters = {
            (shard, sku): [int(h["on_hand"]), int(h["held"]), int(h["sold"])]
            for shard, state in real.items()
            for sku, h in state.skus.items()
        }
        assert counters == real_counters, "replayed ledger (on_hand, held, sold) vs Redis"
        # Redis drops a user's field at zero units (and the hash with its last field): so does the replay.
        replayed_units = {sku: {u: n for u, n in per.items() if n} for sku, per in units.items()}
        real_units = {(shard, sku): users for shard, state in real.items() for sku, users in state.users.items()}
        assert {k: v for k, v in replayed_units.items() if v} == real_units, "replayed per-user units vs Redis"

    async def check_rebuild_image_equals_redis(self, real: dict[int, ShardState]) -> None:
        images = await load_images(self.pg, self.keys, self.keys.all_shards())
        for shard, image in images.items():
            state = real[shard]
            # PostgreSQL is complete and consistent here: a rebuild must not need to repair anything.
            assert not image.raised, f"shard {shard}: the image raised on_hand {image.raised}"
            assert not [p.reservation_id for p in image.parts if p.dropped], f"shard {shard}: the image dropped holds"
            image_skus = {
                s.sku: (s.on_hand, s.safety_stock, s.held, s.sold, s.mode, s.hold_ttl_seconds, s.per_user_limit)
                for s in image.skus.values()
            }
            real_skus = {
                sku: (
                    int(h["on_hand"]),
                    int(h["safety_stock"]),
                    int(h["held"]),
                    int(h["sold"]),
                    h["mode"],
                    int(h["hold_ttl_seconds"]),
                    int(h["per_user_limit"]),
                )
                for sku, h in state.skus.items()
            }
            assert image_skus == real_skus, f"shard {shard}: image SKUs vs Redis"
            assert {s.tenant for s in image.skus.values()} <= {TENANT}
            image_users = {sku: users for (_, sku), users in image.users.items()}
            assert image_users == state.users, f"shard {shard}: image per-user units vs Redis"
            assert image.expiry() == state.expiry, f"shard {shard}: image expiry index vs Redis"
            image_parts = {p.reservation_id: part_fields(p, image) for p in image.parts}
            real_parts = {rid: redis_part_fields(h) for rid, h in state.parts.items()}
            statuses = {rid: f["st"] for rid, f in image_parts.items()}
            assert statuses == {rid: f["st"] for rid, f in real_parts.items()}, f"shard {shard}: part statuses"
            assert image_parts == real_parts, f"shard {shard}: image reservation parts vs Redis"

    def check_refusal(self, error: StockError, expected: Refusals) -> None:
        assert expected, f"refused with {error.code} ({error.detail}) but the model grants it"
        assert error.code in expected, f"refused with {error.code} ({error.detail}), model expects {expected}"
        details = expected[error.code]
        if error.code == "sku_not_found":
            assert error.extra["sku"] in details
        elif error.code == "limit_exceeded":
            sku = error.extra["sku"]
            assert sku in details, f"limit_exceeded on {sku}, model expects it on {details}"
            got = (error.extra["limit"], error.extra["units"], error.extra["requested"])
            assert got == details[sku], f"limit_exceeded {got}, model (limit, units, requested) {details[sku]}"
        elif error.code == "insufficient_stock":
            short = error.extra["items"]
            assert short, "insufficient_stock names no item"
            for item in short:
                assert item["sku"] in details, f"{item} reported short, model expects {details}"
                assert (item["available"], item["requested"]) == details[item["sku"]], (item, details)

    def check_reservation(self, got: Reservation, rid: str) -> None:
        res = self.model.reservations[rid]
        assert got.id == rid
        assert got.status == res.status, f"{rid}: status {got.status}, model {res.status}"
        assert got.user_id == res.user
        assert [(i.sku, i.quantity) for i in got.items] == [(line.sku, line.qty) for line in res.lines]
        if res.ttl is None:
            assert got.expires_at is None, f"{rid}: expires_at {got.expires_at}, model: no deadline"
        else:
            assert got.expires_at is not None, f"{rid}: no expires_at, model: {res.ttl} s hold"
            ttl = got.expires_at - got.created_at
            assert abs(ttl - timedelta(seconds=res.ttl)) <= timedelta(milliseconds=1), (rid, ttl, res.ttl)

    # -- rules ----------------------------------------------------------------------------------------

    @initialize(initial=st.lists(new_sku_settings, min_size=len(SKUS), max_size=len(SKUS)))
    def create_skus(self, initial: list[SkuSettings]) -> None:
        # Creation obeys invariant 1 too: safety_stock above on_hand is refused and creates nothing.
        with pytest.raises(StockConflict):
            self.run(self.service.put_sku(TENANT, GHOST, SkuSettings(on_hand=1, safety_stock=2)))
        for sku, settings in zip(SKUS, initial, strict=True):
            _, created = self.run(self.service.put_sku(TENANT, sku, settings))
            assert created
            self.model.skus[sku] = SkuModel(
                on_hand=settings.on_hand,
                safety=settings.safety_stock,
                mode=settings.mode,
                ttl=settings.hold_ttl_seconds,
                limit=settings.per_user_limit,
            )

    def _reserve(self, user: str, items: list[tuple[str, int]]) -> Any:
        expected = self.model.stock_refusals(user, items)
        try:
            got = self.run(self.service.reserve(TENANT, request(user, items)))
        except StockError as error:
            self.check_refusal(error, expected)
            note(f"reserve over {spread(items)}: {error.code}")
            return multiple()
        assert not expected, f"reserve granted ({got.status}), model expects a refusal: {expected}"
        note(f"reserve over {spread(items)}: {got.status}")
        self.model.reserve(got.id, user, items)
        self.check_reservation(got, got.id)
        return got.id

    # unknown_at: where a line for the never-created GHOST goes (None, most of the time: nowhere)
    @rule(target=reservations, user=users, items=items_strategy, unknown_at=st.sampled_from([None] * 9 + [0, 1, 2]))
    def reserve(self, user: str, items: list[tuple[str, int]], unknown_at: int | None) -> Any:
        if unknown_at is not None:
            items = [*items[:unknown_at], (GHOST, 1), *items[unknown_at:]]
        return self._reserve(user, items)

    @rule(rid=reservations)
    def confirm(self, rid: str) -> None:
        res = self.model.reservations[rid]
        expected = self.model.confirm_refusals(res)
        try:
            got = self.run(self.service.confirm(TENANT, rid))
        except StockError as error:
            self.check_refusal(error, expected)
            note(f"confirm {res.status} over {spread(res.lines)}: {error.code}")
            return
        assert not expected, f"confirm of a {res.status} reservation granted, model expects {expected}"
        note(f"confirm {res.status} over {spread(res.lines)}: ok")
        self.model.confirm(res)
        self.check_reservation(got, rid)

    @rule(rid=reservations)
    def release(self, rid: str) -> None:
        res = self.model.reservations[rid]
        expected = self.model.release_refusals(res)
        try:
            got = self.run(self.service.release(TENANT, rid))
        except StockError as error:
            self.check_refusal(error, expected)
            note(f"release {res.status}: {error.code}")
            return
        assert not expected, f"release of a {res.status} reservation granted, model expects {expected}"
        note(f"release {res.status} over {spread(res.lines)}: ok")
        self.model.release(res)
        self.check_reservation(got, rid)

    @rule(horizon=st.sampled_from([SOON, LATER]))
    def expire(self, horizon: int) -> None:
        due = self.model.due(horizon)
        expired = self.run(self.sweeper.sweep_once(now=now_ms() + horizon * 1000))
        assert (expired > 0) == bool(due), f"sweep expired {expired} holds, model has {len(due)} reservations due"
        for res in due:
            note(f"expire over {spread(res.lines)}")
            self.model.give_back(res, EXPIRED)

    @rule(sku=st.sampled_from(SKUS), delta=st.integers(-3, 3).filter(bool))
    def adjust(self, sku: str, delta: int) -> None:
        s = self.model.skus[sku]
        refused = s.on_hand + delta - s.safety < s.held + s.sold
        try:
            self.run(self.service.adjust(TENANT, sku, Adjustment(delta=delta, reason="stocktake")))
        except StockError as error:
            assert refused, f"adjust {delta:+} refused with {error.code}, model grants it"
            assert error.code == "stock_conflict"
            assert (error.extra["held"], error.extra["sold"]) == (s.held, s.sold)
            return
        assert not refused, f"adjust {delta:+} granted, model expects stock_conflict"
        s.on_hand += delta

    @rule(sku=st.sampled_from(SKUS), settings=sku_settings)
    def put_sku(self, sku: str, settings: SkuSettings) -> None:
        s = self.model.skus[sku]
        refused = settings.on_hand - settings.safety_stock < s.held + s.sold
        try:
            _, created = self.run(self.service.put_sku(TENANT, sku, settings))
        except StockError as error:
            assert refused, f"put_sku refused with {error.code}, model grants it"
            assert error.code == "stock_conflict"
            return
        assert not refused, "put_sku granted, model expects stock_conflict"
        assert not created
        s.on_hand, s.safety, s.mode = settings.on_hand, settings.safety_stock, settings.mode
        s.ttl, s.limit = settings.hold_ttl_seconds, settings.per_user_limit

    # -- after every step -----------------------------------------------------------------------------

    @invariant()
    def real_state_matches_model(self) -> None:
        async def read() -> tuple[list[SkuState], list[dict[Any, Any]], list[Reservation], bool]:
            skus = list(self.model.skus)
            states = await asyncio.gather(*(self.service.get_sku(TENANT, sku) for sku in skus))
            units = await asyncio.gather(
                *(self.redis.hgetall(self.keys.user_counts(self.keys.shard_of(TENANT, s), TENANT, s)) for s in skus)
            )
            rids = list(self.model.reservations)
            reservations = await asyncio.gather(*(self.service.get_reservation(TENANT, rid) for rid in rids))
            try:
                await self.service.get_sku(TENANT, GHOST)
                ghost = True
            except SkuNotFound:
                ghost = False
            return list(states), list(units), list(reservations), ghost

        states, units, reservations, ghost = self.run(read())
        assert not ghost, f"{GHOST} was never created but exists"
        for state, sku_units in zip(states, units, strict=True):
            # invariant 1 on the real state, whatever the model says
            assert state.held + state.sold <= state.on_hand - state.safety_stock, f"oversold: {state}"
            assert state.available >= 0, f"negative available: {state}"
            m = self.model.skus[state.sku]
            assert m.available >= 0, f"model bug: {state.sku} {m}"
            real = (state.on_hand, state.safety_stock, state.held, state.sold, state.available)
            expected = (m.on_hand, m.safety, m.held, m.sold, m.available)
            assert real == expected, f"{state.sku} (on_hand, safety, held, sold, available): {real}, model {expected}"
            assert (state.mode, state.hold_ttl_seconds, state.per_user_limit) == (m.mode, m.ttl, m.limit)
            model_units = {u: n for (u, sku), n in self.model.units.items() if sku == state.sku and n}
            real_units = {u: int(n) for u, n in sku_units.items()}
            assert real_units == model_units, f"{state.sku} per-user units {real_units}, model {model_units}"
        for got in reservations:
            self.check_reservation(got, got.id)


def test_sku_layout_spans_shards() -> None:
    keys = KeySpace(SHARDS)
    shards = [keys.shard_of(TENANT, sku) for sku in SKUS]
    assert shards == [shard_of(sku) for sku in SKUS]
    assert len(set(shards)) == 3, "at least two SKUs must live on different shards, and two on the same one"
    assert keys.shard_of(TENANT, GHOST) in shards


# pg_pool applies the migrations (the machine's own pool does not): without it, run alone, every confirm's
# write-through found no stock_movement table.
@pytest.mark.usefixtures("pg_pool")
def test_random_operations_match_the_model(settings: Settings) -> None:
    redis_url, database_url = settings.redis_url, settings.database_url
    assert redis_url and database_url
    run_state_machine_as_test(
        lambda: StockMachine(redis_url, database_url),
        settings=hypothesis.settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


@pytest.mark.usefixtures("pg_pool")  # the migrations, as above
@pytest.mark.parametrize(
    "on_payment_sku",
    [
        pytest.param("kiwi", id="pending-line-on-the-same-shard"),
        pytest.param("pear", id="pending-line-on-another-shard"),
    ],
)
def test_releasing_an_expired_reservation_changes_nothing(settings: Settings, on_payment_sku: str) -> None:
    """Found by the machine above. A reservation of a pre_reserve SKU and an on_payment SKU expires; releasing
    it must change nothing (it stays `expired`, and paying afterwards still deducts if the stock is there),
    whether or not the two SKUs share a shard."""
    assert settings.redis_url and settings.database_url
    machine = StockMachine(settings.redis_url, settings.database_url)
    try:
        pre_reserve = SkuSettings(on_hand=1, mode=Mode.PRE_RESERVE, hold_ttl_seconds=SHORT_TTL)
        on_payment = SkuSettings(on_hand=1, mode=Mode.ON_PAYMENT, hold_ttl_seconds=SHORT_TTL)
        machine.create_skus([on_payment if sku == on_payment_sku else pre_reserve for sku in SKUS])
        rid = str(machine.reserve(user="ann", items=[("apple", 1), (on_payment_sku, 1)], unknown_at=None))
        assert machine.model.reservations[rid].status == HELD
        machine.expire(horizon=SOON)
        machine.real_state_matches_model()
        machine.release(rid=rid)
        machine.real_state_matches_model()
        machine.confirm(rid=rid)
        machine.real_state_matches_model()
    finally:
        machine.teardown()
