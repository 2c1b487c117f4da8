"""A confirmation is durable before it is answered (app/stock/service.py: confirm and _write_through).

No write-behind worker runs here until a test starts one on purpose: the `redis` fixture flushed Redis,
so not even a consumer group exists. Whatever PostgreSQL holds when `confirm` returns, confirm wrote.

When the ledger cannot be written (PostgreSQL stopped under a pool with live connections, a closed pool,
a PostgreSQL that does not answer in time, PostgreSQL stopping while confirms are in flight), confirm
must refuse with LedgerUnavailable (the API's 503) and leave the reservation exactly as it was: still
held (or pending) with its deadline, counters and per-user units unchanged, and its stream telling the
story ('confirmed' then the compensating 'unconfirmed'), so that the ledger the worker builds from the
stream still adds up. A later confirm, PostgreSQL back, succeeds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from app.stock.clock import now_ms
from app.stock.errors import LedgerUnavailable
from app.stock.events import ReservationRecord, parse_entries
from app.stock.keys import KeySpace
from app.stock.schemas import Reservation, ReservationItem, ReservationRequest, SkuSettings
from app.stock.service import StockService
from app.store.embedded import EmbeddedPostgres
from app.store.postgres import apply_migrations
from app.store.scripts import Scripts
from app.worker.consumer import WriteBehindWorker
from app.worker.ledger import PostgresLedger
from tests.conftest import STATE_TABLES, Servers, embedded_data_dir
from tests.helpers import snapshot

TENANT = "default"
CONFIRM_KINDS = ("confirmed", "sold")


# -- building reservations ------------------------------------------------------------------------------


def order(user: str, *items: tuple[str, int], channel: str | None = None) -> ReservationRequest:
    return ReservationRequest(
        user_id=user, items=[ReservationItem(sku=s, quantity=q) for s, q in items], channel=channel
    )


def two_on_one_shard_and_one_elsewhere(keys: KeySpace) -> tuple[str, str, str]:
    """(a1, a2, b): a1 and a2 share a shard, b lives on another one."""
    by_shard: dict[int, list[str]] = {}
    for i in range(10_000):
        name = f"item-{i}"
        by_shard.setdefault(keys.shard_of(TENANT, name), []).append(name)
        pairs = [names for names in by_shard.values() if len(names) >= 2]
        if pairs and len(by_shard) >= 2:
            a1, a2 = pairs[0][:2]
            b = next(names[0] for shard, names in by_shard.items() if shard != keys.shard_of(TENANT, a1))
            return a1, a2, b
    raise AssertionError("no such SKU names among 10,000")


@dataclass(frozen=True)
class Line:
    quantity: int
    kind: str  # the confirm event: 'confirmed' (from the hold) or 'sold' (deducted directly)
    before: str  # the part's status before the confirm
    how: str  # 'h' from the hold, 'd' direct


async def single_shard(service: StockService, keys: KeySpace) -> tuple[Reservation, dict[str, Line]]:
    await service.put_sku(TENANT, "wine", SkuSettings(on_hand=5, per_user_limit=4))
    held = await service.reserve(TENANT, order("alice", ("wine", 2), channel="web"))
    assert (held.status, held.expires_at is not None) == ("held", True)
    return held, {"wine": Line(2, "confirmed", "held", "h")}


async def cross_shard(service: StockService, keys: KeySpace) -> tuple[Reservation, dict[str, Line]]:
    a1, a2, b = two_on_one_shard_and_one_elsewhere(keys)
    await service.put_sku(TENANT, a1, SkuSettings(on_hand=10))
    await service.put_sku(TENANT, a2, SkuSettings(on_hand=10, hold_ttl_seconds=600))
    await service.put_sku(TENANT, b, SkuSettings(on_hand=10, mode="on_order"))
    # home shard first, then the other shard, then back to the home shard: the order must survive
    held = await service.reserve(TENANT, order("bob", (a1, 2), (b, 1), (a2, 3), channel="app"))
    assert held.status == "held"
    lines = {a1: Line(2, "confirmed", "held", "h"), b: Line(1, "confirmed", "held", "h")}
    lines[a2] = Line(3, "confirmed", "held", "h")
    return held, lines


async def on_payment(service: StockService, keys: KeySpace) -> tuple[Reservation, dict[str, Line]]:
    await service.put_sku(TENANT, "vinyl", SkuSettings(on_hand=3, mode="on_payment", per_user_limit=2))
    pending = await service.reserve(TENANT, order("carol", ("vinyl", 2)))
    assert (pending.status, pending.expires_at) == ("pending", None)
    return pending, {"vinyl": Line(2, "sold", "pending", "d")}


RESERVATIONS: dict[str, Callable[[StockService, KeySpace], Awaitable[tuple[Reservation, dict[str, Line]]]]] = {
    "single_shard": single_shard,
    "cross_shard": cross_shard,
    "on_payment": on_payment,
}


# -- reading the two stores -----------------------------------------------------------------------------


async def reservation_events(redis: Redis, keys: KeySpace, shard: int, rid: str) -> list[tuple[str, dict[str, str]]]:
    return [(str(eid), dict(f)) for eid, f in await redis.xrange(keys.events(shard)) if f.get("res") == rid]


async def entries_added(redis: Redis, keys: KeySpace) -> int:
    """Events ever added to the shard streams (not their length: workers trim what they persisted)."""
    total = 0
    for shard in keys.all_shards():
        if await redis.exists(keys.events(shard)):
            total += int((await redis.xinfo_stream(keys.events(shard)))["entries-added"])
    return total


async def sku_counters(redis: Redis, keys: KeySpace, sku: str) -> tuple[int, int, int]:
    shard = keys.shard_of(TENANT, sku)
    on_hand, held, sold = await redis.hmget(keys.sku(shard, TENANT, sku), ["on_hand", "held", "sold"])
    return int(on_hand), int(held), int(sold)


def without_streams(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.endswith(":events")}


async def assert_no_worker(redis: Redis, keys: KeySpace, pool: asyncpg.Pool) -> None:
    """What PostgreSQL holds came from confirm itself: no consumer group, no worker progress."""
    for shard in keys.all_shards():
        if await redis.exists(keys.events(shard)):
            assert await redis.xinfo_groups(keys.events(shard)) == [], f"a consumer group exists on shard {shard}"
    assert await pool.fetchval("SELECT count(*) FROM worker_progress") == 0


async def assert_durable(
    pool: asyncpg.Pool, redis: Redis, keys: KeySpace, reservation: Reservation, lines: dict[str, Line]
) -> int:
    """PostgreSQL holds the confirmation: the events this confirm emitted (by stream id), every line
    confirmed, the reservation's document, and the counters the confirm left on each SKU. Returns how
    many confirm events of the reservation the ledger holds (an earlier refused confirm's included)."""
    rid = reservation.id
    confirm_events = set()  # what this confirmation emitted: the ids each part keeps as `ce` (first last)
    for shard in {keys.shard_of(TENANT, sku) for sku in lines}:
        ce = await redis.hget(keys.reservation(shard, rid), "ce")
        assert ce, f"the part on shard {shard} is not confirmed"
        first, last = ce.split()
        for eid, f in await redis.xrange(keys.events(shard), min=first, max=last):
            assert f["res"] == rid and f["type"] in CONFIRM_KINDS, (eid, f)
            confirm_events.add((shard, str(eid), f["sku"], f["type"], int(f["qty"])))
    assert {(e[2], e[3], e[4]) for e in confirm_events} == {(sku, ln.kind, ln.quantity) for sku, ln in lines.items()}

    rows = await pool.fetch(
        "SELECT shard, event_id, sku, kind, quantity, on_hand_after, held_after, sold_after FROM stock_movement"
        " WHERE reservation_id = $1 AND kind = ANY($2::text[])",
        rid,
        list(CONFIRM_KINDS),
    )
    in_ledger = {(r["shard"], r["event_id"], r["sku"], r["kind"], r["quantity"]): r for r in rows}
    assert confirm_events <= set(in_ledger), f"not in the ledger: {confirm_events - set(in_ledger)}"
    for event in confirm_events:  # nothing touched these SKUs since: the counters after it are Redis's now
        r = in_ledger[event]
        assert (r["on_hand_after"], r["held_after"], r["sold_after"]) == await sku_counters(redis, keys, r["sku"])

    line_rows = await pool.fetch(
        "SELECT sku, shard, tenant, user_id, quantity, status, status_before, confirmed_how"
        " FROM reservation_line WHERE reservation_id = $1",
        rid,
    )
    assert {r["sku"]: dict(r) for r in line_rows} == {
        sku: {
            "sku": sku,
            "shard": keys.shard_of(TENANT, sku),
            "tenant": TENANT,
            "user_id": reservation.user_id,
            "quantity": line.quantity,
            "status": "confirmed",
            "status_before": line.before,
            "confirmed_how": line.how,
        }
        for sku, line in lines.items()
    }

    doc = await pool.fetchrow(
        "SELECT tenant, user_id, channel, items, created_at, expires_at FROM reservation WHERE id = $1", rid
    )
    assert doc is not None, "the reservation's document is not in PostgreSQL"
    assert (doc["tenant"], doc["user_id"], doc["channel"]) == (TENANT, reservation.user_id, reservation.channel)
    asked = [{"sku": i.sku, "quantity": i.quantity} for i in reservation.items]
    assert orjson.loads(doc["items"]) == asked  # in the order asked
    assert doc["created_at"] == reservation.created_at
    assert doc["expires_at"] == reservation.expires_at

    for sku in lines:
        row = await pool.fetchrow("SELECT on_hand, held, sold FROM sku WHERE tenant = $1 AND sku = $2", TENANT, sku)
        assert row is not None, f"no sku row for {sku}"
        assert (row["on_hand"], row["held"], row["sold"]) == await sku_counters(redis, keys, sku)
    return len(in_ledger)


async def drain(worker: WriteBehindWorker) -> None:
    await worker.ensure_groups()
    for _ in range(200):
        if not await worker.step():
            return
    raise AssertionError("the worker did not run dry in 200 steps")


# -- a working ledger -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(RESERVATIONS))
async def test_postgres_holds_the_confirmation_when_confirm_returns(
    kind: str, service: StockService, redis: Redis, keys: KeySpace, pg: asyncpg.Pool
) -> None:
    reservation, lines = await RESERVATIONS[kind](service, keys)

    confirmed = await service.confirm(TENANT, reservation.id)

    assert confirmed.status == "confirmed"
    await assert_no_worker(redis, keys, pg)
    assert await assert_durable(pg, redis, keys, reservation, lines) == len(lines)  # one event per line


async def test_confirming_twice_writes_nothing_twice(
    service: StockService, redis: Redis, keys: KeySpace, pg: asyncpg.Pool
) -> None:
    # the second confirm answers ALREADY with the first one's event ids and writes them through again
    # (a retry after a lost answer): idempotent on the event id, nothing is doubled
    reservation, lines = await cross_shard(service, keys)
    await service.confirm(TENANT, reservation.id)
    count = await pg.fetchval("SELECT count(*) FROM stock_movement")

    again = await service.confirm(TENANT, reservation.id)

    assert again.status == "confirmed"
    assert await pg.fetchval("SELECT count(*) FROM stock_movement") == count
    assert await assert_durable(pg, redis, keys, reservation, lines) == len(lines)


# -- a broken ledger ------------------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL of this module's own, so it can be stopped and started again on the same data
    directory (and so the same socket, the same URL) without touching the session's server."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: EmbeddedPostgres | None = None
        self.url = ""

    def start(self) -> None:
        if self.server is None:
            self.server = EmbeddedPostgres(self.data_dir)
            url = self.server.start()
            assert self.url in ("", url), f"restarted on another URL: {url} (was {self.url})"
            self.url = url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    with ExitStack() as stack:
        private = PrivatePostgres(embedded_data_dir(stack) / "postgres")
        stack.callback(private.stop)  # runs before the directory is removed (last in, first out)
        private.start()
        yield private


async def live_pool(private: PrivatePostgres, connections: int, empty: bool = True) -> asyncpg.Pool:
    """A migrated pool on the private server (emptied unless `empty` is false) holding `connections`
    established connections."""
    private.start()
    pool = await asyncpg.create_pool(private.url, min_size=0, max_size=connections)
    assert pool is not None
    await apply_migrations(pool)
    if empty:
        await pool.execute(f"TRUNCATE {', '.join(STATE_TABLES)}")
    await asyncio.gather(*(pool.fetchval("SELECT pg_sleep(0.05)") for _ in range(connections)))
    return pool


@dataclass
class BrokenLedger:
    ledger: PostgresLedger
    restore: Callable[[], Awaitable[asyncpg.Pool]]  # PostgreSQL back: the pool a working ledger uses


@pytest_asyncio.fixture(params=["stopped", "closed", "stalled"])
async def broken(
    request: pytest.FixtureRequest, private_pg: PrivatePostgres, servers: Servers, pg: asyncpg.Pool
) -> AsyncIterator[BrokenLedger]:
    if request.param == "stopped":
        # the pool had live connections when the server went away; PostgreSQL comes back on the same URL
        # and the same pool must work again
        pool = await live_pool(private_pg, 2)
        private_pg.stop()
        await asyncio.sleep(0.2)  # the pool's connections have seen it go (the instant itself: see below)

        async def restart() -> asyncpg.Pool:
            private_pg.start()
            return pool

        try:
            yield BrokenLedger(PostgresLedger(pool), restart)
        finally:
            pool.terminate()
            private_pg.stop()
    elif request.param == "closed":
        closed = await asyncpg.create_pool(servers.database_url, min_size=1, max_size=1)
        assert closed is not None
        await closed.close()

        async def session_pool() -> asyncpg.Pool:
            return pg

        yield BrokenLedger(PostgresLedger(closed), session_pool)
    else:
        # PostgreSQL answers nothing in time: another transaction holds the ledger table locked, and the
        # write-through waits for it past its (shortened) timeout
        conn = await pg.acquire()
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE stock_movement IN ACCESS EXCLUSIVE MODE")
        locked = True

        async def unlock() -> asyncpg.Pool:
            nonlocal locked
            if locked:
                await tx.rollback()
                locked = False
            return pg

        try:
            yield BrokenLedger(PostgresLedger(pg, timeout_s=0.5), unlock)
        finally:
            await unlock()
            await pg.release(conn)


@pytest.mark.parametrize("kind", list(RESERVATIONS))
async def test_confirm_without_a_ledger_is_refused_and_changes_nothing(
    kind: str,
    broken: BrokenLedger,
    service: StockService,
    scripts: Scripts,
    redis: Redis,
    keys: KeySpace,
) -> None:
    # given a reservation made while PostgreSQL was fine (holds do not wait for it)
    reservation, lines = await RESERVATIONS[kind](service, keys)
    shards = sorted({keys.shard_of(TENANT, sku) for sku in lines})
    home = keys.shard_of(TENANT, reservation.items[0].sku)
    deadline = await redis.hget(keys.reservation(home, reservation.id), "exp")
    before = await snapshot(redis)
    seen = {shard: len(await reservation_events(redis, keys, shard, reservation.id)) for shard in shards}
    cut_off = StockService(redis, scripts, keys, broken.ledger, idempotency_ttl_seconds=3600)

    # when payment arrives and the ledger cannot be written
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable) as refused:
        await cut_off.confirm(TENANT, reservation.id)
    elapsed = time.monotonic() - started

    # then it is refused as ledger_unavailable, within the ledger's timeout (plus slack), not hanging
    assert refused.value.code == "ledger_unavailable"
    assert elapsed < broken.ledger.timeout_s + 2.0, f"confirm took {elapsed:.1f}s to give up"
    # and Redis is exactly as before, streams aside: status, deadline, expiry index, counters, user units
    after = await snapshot(redis)
    assert without_streams(after) == without_streams(before)
    still = await service.get_reservation(TENANT, reservation.id)
    assert (still.status, still.expires_at) == (reservation.status, reservation.expires_at)
    if reservation.expires_at is not None:
        assert await redis.zscore(keys.expiry(home), reservation.id) == float(deadline)
        assert int(deadline) > now_ms(), "the hold should still have time left"
    # and each shard's stream tells it: the confirm events, then their compensation, line by line
    undo = {"confirmed": "unconfirmed", "sold": "unsold"}
    for shard in shards:
        new = (await reservation_events(redis, keys, shard, reservation.id))[seen[shard] :]
        on_shard = [sku for sku in lines if keys.shard_of(TENANT, sku) == shard]
        assert [(f["type"], f["sku"]) for _, f in new] == [(lines[s].kind, s) for s in on_shard] + [
            (undo[lines[s].kind], s) for s in on_shard
        ], f"shard {shard}"
        assert all(f["st"] == reservation.status for _, f in new[len(on_shard) :]), "compensation's status"

    # when PostgreSQL is back, a retried confirm succeeds and is durable
    pool = await broken.restore()
    leftover = await pool.fetchval("SELECT count(*) FROM stock_movement WHERE reservation_id = $1", reservation.id)
    assert leftover == 0, "the refused confirm left rows in the ledger"
    working = StockService(redis, scripts, keys, PostgresLedger(pool), idempotency_ttl_seconds=3600)
    assert (await working.confirm(TENANT, reservation.id)).status == "confirmed"
    assert await assert_durable(pool, redis, keys, reservation, lines) == len(lines)

    # and once the worker has persisted the rest (holds, the refused confirm and its undoing, arriving
    # after the later confirm), the ledger has every event once and the newest event still wins
    await drain(WriteBehindWorker(redis, pool, keys, consumer="after-outage", batch=100, block_ms=10))
    assert await pool.fetchval("SELECT count(*) FROM stock_movement") == await entries_added(redis, keys)
    assert await assert_durable(pool, redis, keys, reservation, lines) == 2 * len(lines)  # the refused one too


async def test_the_ledger_is_unavailable_the_instant_postgres_dies(
    private_pg: PrivatePostgres, service: StockService, redis: Redis, keys: KeySpace, pg: asyncpg.Pool
) -> None:
    # The SaleLedger contract (app/stock/events.py): a confirmation that could not be made durable raises
    # LedgerUnavailable, which the API answers 503 + Retry-After. Anything else leaks as a 500 that a
    # payment provider need not retry. When PostgreSQL goes away under a pool's idle connections, the
    # first use of each connection finds out its own way (closed mid-operation, a protocol state error,
    # the socket gone); here the writes follow the stop with no pause, racing the pool noticing.
    reservation, _ = await single_shard(service, keys)
    await service.confirm(TENANT, reservation.id)  # the session's PostgreSQL: just to have real events
    shard = keys.shard_of(TENANT, "wine")
    first, last = (await redis.hget(keys.reservation(shard, reservation.id), "ce")).split()
    events = parse_entries(shard, await redis.xrange(keys.events(shard), min=first, max=last))
    record = ReservationRecord(
        id=reservation.id,
        tenant=TENANT,
        user_id=reservation.user_id,
        items=[i.model_dump() for i in reservation.items],
        channel=reservation.channel,
        created_at_ms=int(reservation.created_at.timestamp() * 1000),
        expires_at_ms=int(reservation.expires_at.timestamp() * 1000) if reservation.expires_at else 0,
    )
    pool = await live_pool(private_pg, 3)
    ledger = PostgresLedger(pool)
    outcomes = []
    try:
        private_pg.stop()
        for _ in range(3):
            try:
                await ledger.record_confirmation(events, record)
                outcomes.append("written")
            except LedgerUnavailable:
                outcomes.append("ledger_unavailable")
            except Exception as exc:  # what leaked instead is the finding
                outcomes.append(repr(exc))
    finally:
        pool.terminate()
        private_pg.stop()

    assert outcomes == ["ledger_unavailable"] * 3


async def pay_while_postgres_stops(
    private: PrivatePostgres, redis: Redis, scripts: Scripts, keys: KeySpace, rids: list[str], empty: bool
) -> dict[str, str]:
    """Confirms `rids` from 8 concurrent payers through a ledger on the private server, which stops once
    20 confirms went through. Returns each reservation's outcome."""
    outcomes: dict[str, str] = {}
    queue = list(rids)
    pool = await live_pool(private, 8, empty=empty)
    cut_off = StockService(redis, scripts, keys, PostgresLedger(pool), idempotency_ttl_seconds=3600)
    some_confirmed = asyncio.Event()

    async def payer() -> None:
        while queue:
            rid = queue.pop()
            try:
                await cut_off.confirm(TENANT, rid)
                outcomes[rid] = "confirmed"
                if sum(o == "confirmed" for o in outcomes.values()) >= 20:
                    some_confirmed.set()
            except LedgerUnavailable:
                outcomes[rid] = "ledger_unavailable"
            except Exception as exc:  # what leaked instead is the finding
                outcomes[rid] = repr(exc)

    payers = [asyncio.create_task(payer()) for _ in range(8)]
    try:
        await asyncio.wait_for(some_confirmed.wait(), timeout=10)
        await asyncio.to_thread(private.stop)
        await asyncio.wait_for(asyncio.gather(*payers), timeout=30)
    finally:
        for task in payers:
            task.cancel()
        pool.terminate()
        private.stop()
    return outcomes


async def test_postgres_stopping_under_concurrent_confirms_leaves_each_durable_or_refused(
    private_pg: PrivatePostgres, service: StockService, scripts: Scripts, redis: Redis, keys: KeySpace
) -> None:
    # PostgreSQL stops while confirmations are in flight (a fast shutdown: open transactions are cut).
    # Each confirm must end one of two ways: answered, and then in PostgreSQL; or LedgerUnavailable (the
    # API's 503), and then still held. Any other exception is a 500 to the payment provider. Three rounds
    # repeat the race, since which connection dies in which state varies from run to run.
    a1, a2, b = two_on_one_shard_and_one_elsewhere(keys)
    for sku in (a1, a2, b):
        await service.put_sku(TENANT, sku, SkuSettings(on_hand=100_000))
    shapes = [[(a1, 1)], [(a2, 1), (b, 2)]]
    outcomes: dict[str, str] = {}
    for round_ in range(3):
        held = [await service.reserve(TENANT, order(f"r{round_}u{i}", *shapes[i % 2])) for i in range(150)]
        outcomes |= await pay_while_postgres_stops(private_pg, redis, scripts, keys, [r.id for r in held], round_ == 0)

    leaked = {rid: o for rid, o in outcomes.items() if o not in ("confirmed", "ledger_unavailable")}
    assert not leaked, f"{len(leaked)} of {len(outcomes)} confirms raised neither: {sorted(set(leaked.values()))}"
    refused = [rid for rid, o in outcomes.items() if o == "ledger_unavailable"]
    assert refused, "PostgreSQL stopped mid-stream, yet no confirm was refused"
    for rid in refused:
        assert (await service.get_reservation(TENANT, rid)).status == "held", rid

    # PostgreSQL back: every confirm that was answered is there, before any worker ran
    private_pg.start()
    pool = await asyncpg.create_pool(private_pg.url, min_size=1, max_size=2)
    assert pool is not None
    try:
        lines = "SELECT reservation_id, array_agg(DISTINCT status) AS s FROM reservation_line GROUP BY reservation_id"
        in_pg = {r["reservation_id"]: r["s"] for r in await pool.fetch(lines)}
        lost = [rid for rid, o in outcomes.items() if o == "confirmed" and in_pg.get(rid) != ["confirmed"]]
        assert not lost, f"{len(lost)} answered confirms are not in PostgreSQL: {lost[:3]}"
        # and once the worker persisted the streams, PostgreSQL and Redis agree on every reservation (a
        # refused confirm whose transaction did commit is undone by its 'unconfirmed' event)
        await drain(WriteBehindWorker(redis, pool, keys, consumer="after-stop", batch=500, block_ms=10))
        assert await pool.fetchval("SELECT count(*) FROM stock_movement") == await entries_added(redis, keys)
        in_pg = {r["reservation_id"]: r["s"] for r in await pool.fetch(lines)}
        for rid, outcome in outcomes.items():
            expected = "confirmed" if outcome == "confirmed" else "held"
            assert in_pg.get(rid) == [expected], (rid, outcome, in_pg.get(rid))
    finally:
        await pool.close()
