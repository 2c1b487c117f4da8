"""The stock domain: catalogue changes, reservations, confirmations and releases.

Every change to a counter happens inside one Lua script call on one shard, together with its event.
A reservation whose SKUs live on several shards is reserved shard by shard (home shard first) and, if a
later shard refuses, the shards already done are undone by compensation (release.lua with 'undo'), so
the reservation is all-or-nothing. Confirm spans shards the same way, undone by revert_confirm.lua.
Shards are always visited in the same order (the order of the reservation's first line per shard), so
two concurrent operations on one reservation meet on its home shard first.

A confirmation is durable before it is answered: the events confirm.lua emitted are written through to
the SaleLedger (PostgreSQL) in one transaction; if that fails, the confirm is reverted and refused with
LedgerUnavailable, so the hold stays as it was. Holds and releases are write-behind (the worker).

Every script refuses to run on a shard without its ready marker (NOT_READY), and reads check it too:
a Redis that lost its data answers not_ready until it is rebuilt from PostgreSQL.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from app.stock.buckets import Split, SplitMap, bucket_order, bucket_sku, is_bucket, parent_sku
from app.stock.channels import MAX_CHANNELS, ChannelSettings, channel_states
from app.stock.clock import now_ms
from app.stock.errors import (
    HoldCooldown,
    IdempotencyConflict,
    InsufficientStock,
    LimitExceeded,
    ListingNotFound,
    NotEligible,
    NotReady,
    ReservationBusy,
    ReservationConfirmed,
    ReservationNotFound,
    ReservationReleased,
    ScriptCode,
    SkuNotFound,
    SplitConflict,
    StockConflict,
    StockError,
    TooManyChannels,
)
from app.stock.events import ReservationRecord, SaleLedger, parse_entries
from app.stock.idempotency import IdempotencyRequest
from app.stock.keys import KeySpace
from app.stock.listings import ListingCatalogue
from app.stock.policy import ELIGIBILITY_RULES, NO_BUYER_ARGS, POLICY_FIELDS, policy_from_flat
from app.stock.presale import NO_PRESALE_ARGS, PRESALE_FIELDS, presale_free, presale_state
from app.stock.reservation_ids import home_shard_of, new_reservation_id, with_home
from app.stock.schemas import (
    Adjustment,
    Mode,
    Receipt,
    ReceiptState,
    Reservation,
    ReservationItem,
    ReservationLine,
    ReservationRequest,
    ReservationStatus,
    SkuSettings,
    SkuState,
    available_units,
    from_ms,
)
from app.stock.sold_out import SoldOutBook
from app.store.scripts import Scripts

if TYPE_CHECKING:
    from app.stock.splitting import Splitter

# A lease outlives any sane multi-shard operation (a few script calls, milliseconds) yet frees a
# reservation soon after a crashed holder; a second caller waits up to LEASE_WAIT_SECONDS for it.
LEASE_SECONDS = 10.0
LEASE_WAIT_SECONDS = 5.0

# The part scripts that read or write the hoarding records (lua/includes/policy.lua).
_WITH_HOARDING_RECORDS = frozenset({"reserve", "release"})
# A SKU hash's fields as SkuState reads them (and the catalogue scripts answer them): counters,
# settings, the purchase policy, then the backordered units and the presale.
SKU_STATE_FIELDS = ["on_hand", "safety_stock", "held", "sold", "mode", "hold_ttl_seconds", "per_user_limit"]
SKU_STATE_FIELDS += [*POLICY_FIELDS, "backordered", *PRESALE_FIELDS]
# A receipt reads the head of the SKU's backorder queue in pages of this many; receive_stock.lua checks
# them and answers STALE if they no longer are the head (a release meanwhile), and the receipt reads again.
RECEIPT_PAGE = 256
RECEIPT_ATTEMPTS = 20

# Overall status of a reservation from its parts' statuses: a release or an expiry of any part speaks
# for the whole (the others follow within one sweep, deadlines being shared); 'confirmed' only when
# every part is.
_STATUS_PRECEDENCE = [
    ReservationStatus.RELEASED,
    ReservationStatus.EXPIRED,
    ReservationStatus.HELD,
    ReservationStatus.PENDING,
    ReservationStatus.CONFIRMED,
]


def combine_statuses(statuses: Sequence[str]) -> ReservationStatus:
    if len(statuses) == 1:
        return ReservationStatus(statuses[0])
    present = {ReservationStatus(s) for s in statuses}
    for status in _STATUS_PRECEDENCE:
        if status in present:
            return status
    raise ValueError("a reservation has at least one part")


@dataclass(frozen=True, slots=True)
class _Part:
    shard: int
    lines: list[tuple[int, ReservationItem]]  # (index in the request, item)


@dataclass(frozen=True, slots=True)
class _Loaded:
    reservation_id: str
    tenant: str
    user_id: str
    items: list[ReservationItem]
    channel: str | None
    created_at: int
    deadline: int
    parts: list[_Part]
    statuses: list[str]
    backorders: dict[str, tuple[int, int]]  # SKU -> (units of its line on backorder, the SKU's ETA ms)


class StockService:
    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: KeySpace,
        ledger: SaleLedger,
        idempotency_ttl_seconds: int,
        sold_out: SoldOutBook | None = None,
        listings: ListingCatalogue | None = None,
        splits: SplitMap | None = None,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.ledger = ledger
        self._idem_ttl = idempotency_ttl_seconds
        self.sold_out = sold_out  # None: every reservation goes to Redis
        self.listings = listings  # None: reservations name SKUs only
        self.splits = splits  # None: no SKU is split (app/stock/buckets.py)
        self.splitter: Splitter | None = None  # set with splits: catalogue calls on split SKUs

    def split_of(self, tenant: str, sku: str) -> Split | None:
        """The SKU's split as this process knows it, None when it is not split."""
        if self.splits is None or self.splitter is None:
            return None
        return self.splits.get(tenant, sku)

    # -- catalogue ------------------------------------------------------------------------------------

    async def put_sku(
        self, tenant: str, sku: str, settings: SkuSettings, idem: IdempotencyRequest | None = None
    ) -> tuple[SkuState, bool]:
        """Creates or updates a SKU; atomic with its event and its idempotency record (set_sku-4.lua).
        Returns the state and whether the SKU was created. A split SKU's PUT is the splitter's."""
        if (split := self.split_of(tenant, sku)) is not None and self.splitter is not None:
            return await self.splitter.put_sku(tenant, sku, split, settings, idem), False
        return await self.put_bucket(tenant, sku, settings, idem)

    async def put_bucket(
        self, tenant: str, sku: str, settings: SkuSettings, idem: IdempotencyRequest | None = None
    ) -> tuple[SkuState, bool]:
        """put_sku on one SKU as the engine stores it (a SKU that is not split, or one bucket of a split one)."""
        shard = self.keys.shard_of(tenant, sku)
        reply = await self.scripts.call(
            "set_sku",
            [
                self.keys.sku(shard, tenant, sku),
                self.keys.events(shard),
                self._idem_key(shard, tenant, idem),
                self.keys.ready(shard),
            ],
            [
                tenant,
                sku,
                settings.on_hand,
                settings.safety_stock,
                settings.mode.value,
                settings.hold_ttl_seconds,
                settings.per_user_limit or 0,
                now_ms(),
                idem.fingerprint if idem else "",
                self._idem_ttl,
                *settings.script_args(),
                *(settings.presale.script_args() if settings.presale else NO_PRESALE_ARGS),
            ],
        )
        if int(reply[0]) < 0:
            raise _script_error(int(reply[0]), reply, sku=sku, shard=shard)
        state = self._seen(tenant, await self._state(shard, tenant, sku, reply[1:]))
        return state, int(reply[0]) == 1

    async def adjust(
        self, tenant: str, sku: str, adjustment: Adjustment, idem: IdempotencyRequest | None = None
    ) -> SkuState:
        """Restocks or shrinks on_hand by a delta; atomic with its event (adjust_stock-4.lua). On a split
        SKU, the splitter makes it on bucket 0 and rebalances."""
        if (split := self.split_of(tenant, sku)) is not None and self.splitter is not None:
            return await self.splitter.adjust(tenant, sku, split, adjustment, idem)
        return await self.adjust_bucket(tenant, sku, adjustment, idem)

    async def adjust_bucket(
        self, tenant: str, sku: str, adjustment: Adjustment, idem: IdempotencyRequest | None = None
    ) -> SkuState:
        """adjust on one SKU as the engine stores it (one bucket of a split SKU)."""
        shard = self.keys.shard_of(tenant, sku)
        reply = await self.scripts.call(
            "adjust_stock",
            [
                self.keys.sku(shard, tenant, sku),
                self.keys.events(shard),
                self._idem_key(shard, tenant, idem),
                self.keys.ready(shard),
            ],
            [
                tenant,
                sku,
                adjustment.delta,
                now_ms(),
                adjustment.reason,
                idem.fingerprint if idem else "",
                self._idem_ttl,
            ],
        )
        if int(reply[0]) < 0:
            raise _script_error(int(reply[0]), reply, sku=sku, shard=shard)
        return self._seen(tenant, await self._state(shard, tenant, sku, reply[1:]))

    async def receive(
        self, tenant: str, sku: str, receipt: Receipt, idem: IdempotencyRequest | None = None
    ) -> ReceiptState:
        """Goods arrived: books them into on_hand and fills the SKU's backorders with them, oldest first,
        in one receive_stock.lua call (atomic with its events and its idempotency record). The call names
        the parts at the head of the backorder queue, read just before; should the queue have changed
        in between, the script changes nothing and the receipt reads it again. On a split SKU (no
        presale, so no backorders) it is a restock of bucket 0, then a rebalance."""
        if (split := self.split_of(tenant, sku)) is not None and self.splitter is not None:
            return await self.splitter.receive(tenant, sku, split, receipt, idem)
        return await self.receive_bucket(tenant, sku, receipt, idem)

    async def receive_bucket(
        self, tenant: str, sku: str, receipt: Receipt, idem: IdempotencyRequest | None = None
    ) -> ReceiptState:
        """receive on one SKU as the engine stores it."""
        shard = self.keys.shard_of(tenant, sku)
        sku_key, queue = self.keys.sku(shard, tenant, sku), self.keys.backorder_queue(shard, tenant, sku)
        for _ in range(RECEIPT_ATTEMPTS):
            ids = await self._backorder_head(shard, sku_key, queue, sku, receipt.quantity)
            reply = await self.scripts.call(
                "receive_stock",
                [
                    sku_key,
                    queue,
                    self.keys.events(shard),
                    self._idem_key(shard, tenant, idem),
                    *(self.keys.reservation(shard, rid) for rid in ids),
                    self.keys.ready(shard),
                ],
                [
                    tenant,
                    sku,
                    receipt.quantity,
                    now_ms(),
                    receipt.reason,
                    idem.fingerprint if idem else "",
                    self._idem_ttl,
                    len(ids),
                    *ids,
                ],
            )
            code = int(reply[0])
            if code == ScriptCode.STALE:
                continue
            if code < 0:
                raise _script_error(code, reply, sku=sku, shard=shard)
            state = self._seen(tenant, await self._state(shard, tenant, sku, reply[1:]))
            filled, lines = (int(v) for v in reply[1 + len(SKU_STATE_FIELDS) :][:2])
            return ReceiptState(**state.model_dump(), filled=filled, filled_lines=lines)
        raise ReservationBusy(f"the backorders of SKU {sku!r} kept changing during the receipt; retry")

    async def _backorder_head(self, shard: int, sku_key: str, queue: str, sku: str, quantity: int) -> list[str]:
        """The reservations at the head of the SKU's backorder queue whose backordered units cover
        min(quantity, backordered): what receive_stock.lua needs named."""
        to_fill = min(quantity, int(await self.redis.hget(sku_key, "backordered") or 0))
        ids: list[str] = []
        covered, start = 0, 0
        while covered < to_fill:
            page = [str(m) for m in await self.redis.zrange(queue, start, start + RECEIPT_PAGE - 1)]
            if not page:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
                for rid in page:
                    pipe.hget(self.keys.reservation(shard, rid), f"b:{sku}")
                units = await pipe.execute()
            for rid, u in zip(page, units, strict=True):
                ids.append(rid)
                covered += int(u or 0)
                if covered >= to_fill:
                    break
            start += RECEIPT_PAGE
        return ids

    async def put_channel(
        self,
        tenant: str,
        sku: str,
        channel: str,
        settings: ChannelSettings,
        idem: IdempotencyRequest | None = None,
    ) -> tuple[SkuState, bool]:
        """Creates or updates one sales channel of a SKU (set_channel-5.lua, atomic with its event and its
        idempotency record). Returns the SKU's state as that channel sees it, and whether it was created."""
        if self.split_of(tenant, sku) is not None:
            raise SplitConflict(f"SKU {sku!r} is split over buckets; channel quotas need its stock in one place")
        shard = self.keys.shard_of(tenant, sku)
        reply = await self.scripts.call(
            "set_channel",
            [
                self.keys.sku(shard, tenant, sku),
                self.keys.channels(shard, tenant, sku),
                self.keys.events(shard),
                self._idem_key(shard, tenant, idem),
                self.keys.ready(shard),
            ],
            [
                tenant,
                sku,
                channel,
                *settings.script_args(),
                now_ms(),
                idem.fingerprint if idem else "",
                self._idem_ttl,
                MAX_CHANNELS,
            ],
        )
        code = int(reply[0])
        if code == ScriptCode.STOCK_CONFLICT:
            used = int(reply[1])
            raise StockConflict(
                f"channel {channel!r} already took {used} units of SKU {sku!r} from its quota; the quota may not be"
                f" lower than that (releases and expiries give units back)",
                used=used,
                field="quota",
            )
        if code == ScriptCode.TOO_MANY_CHANNELS:
            raise TooManyChannels(f"SKU {sku!r} has {int(reply[1])} channels, the most a SKU may have")
        if code < 0:
            raise _script_error(code, reply, sku=sku, shard=shard)
        return await self.get_sku(tenant, sku, channel), code == 1

    async def _state(self, shard: int, tenant: str, sku: str, values: Sequence[Any]) -> SkuState:
        """A catalogue script's reply as the SKU's state, with its channels (read after the call)."""
        channels = await self.redis.hgetall(self.keys.channels(shard, tenant, sku))
        return sku_state_of(sku, values, {str(f): str(v) for f, v in channels.items()})

    async def get_sku(self, tenant: str, sku: str, channel: str | None = None) -> SkuState:
        """The SKU's state; `available` is what a reservation naming `channel` (None: no channel) may take.
        A split SKU's is the sum of its buckets'."""
        if (split := self.split_of(tenant, sku)) is not None and self.splitter is not None:
            return await self.splitter.state(tenant, sku, split, channel)
        return await self.get_bucket(tenant, sku, channel)

    async def get_bucket(self, tenant: str, sku: str, channel: str | None = None) -> SkuState:
        """get_sku of one SKU as the engine stores it (one bucket of a split SKU)."""
        shard = self.keys.shard_of(tenant, sku)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.ready(shard))
            pipe.hmget(self.keys.sku(shard, tenant, sku), SKU_STATE_FIELDS)
            pipe.hgetall(self.keys.channels(shard, tenant, sku))
            ready, values, channels = await pipe.execute()
        if not ready:
            raise NotReady.for_shard(shard)
        if values[0] is None:
            raise SkuNotFound(f"SKU {sku!r} does not exist", sku=sku)
        state = sku_state_of(sku, values, channels, channel)
        # a read never teaches "sold out": only a refusal does
        if self.sold_out is not None and state.available_total > 0:
            self.sold_out.forget(tenant, [sku])
        return state

    def _seen(self, tenant: str, state: SkuState) -> SkuState:
        """Tells the sold-out fast path what a change made by this process left of a SKU."""
        if self.sold_out is not None:
            self.sold_out.learn(tenant, state.sku, state.available_total)
        return state

    # -- reservations ---------------------------------------------------------------------------------

    async def expand_listings(self, tenant: str, request: ReservationRequest) -> ReservationRequest:
        """The request's listing lines turned into SKU lines (app/stock/listings.py); as it is without."""
        if not request.listings:
            return request
        if self.listings is None:
            raise ListingNotFound(f"listing {request.listings[0].listing!r} does not exist")
        return await self.listings.expand(request, tenant)

    def refuse_known_sold_out(self, tenant: str, request: ReservationRequest) -> None:
        """The sold-out fast path (app/stock/sold_out.py): raises InsufficientStock, with no Redis round
        trip, when this process knows a SKU of the request has nothing left."""
        if self.sold_out is None:
            return
        items = request.items
        if self.splits is not None and self.splits.has_tenant(tenant):
            # a split SKU is sold out only when every bucket it is routed over is (bucket 0 is its own name)
            items = [item for item in items if self._known_sold_out(tenant, item)]
        if refusal := self.sold_out.refusal(tenant, items):
            raise refusal

    def _known_sold_out(self, tenant: str, item: ReservationItem) -> bool:
        assert self.sold_out is not None
        split = self.split_of(tenant, item.sku)
        if split is None or split.buckets <= 1:
            return (tenant, item.sku) in self.sold_out
        return all((tenant, bucket_sku(item.sku, i)) in self.sold_out for i in range(split.buckets))

    async def reserve(
        self, tenant: str, request: ReservationRequest, reservation_id: str | None = None, retry: bool = False
    ) -> Reservation:
        """Holds every line all-or-nothing: one reserve.lua call per shard, compensated on refusal.

        ``reservation_id`` fixes the id (an Idempotency-Key claim chose it); ``retry`` says an earlier
        attempt with that id may have run: its parts are kept, and a reservation it left no longer live
        is answered as it is rather than extended.
        """
        if request.listings:  # the API expands them before its checks; a direct caller may not have
            request = await self.expand_listings(tenant, request)
        if self.splits is not None and self.splits.has_tenant(tenant):
            routed = {
                i: split
                for i, item in enumerate(request.items)
                if (split := self.split_of(tenant, item.sku)) is not None and split.buckets > 1
            }
            if routed:
                rid = reservation_id or self.new_reservation_id(tenant, request)
                return await self._reserve_split(tenant, request, routed, rid, retry)
        return await self._reserve_items(tenant, request, reservation_id, retry)

    async def _reserve_items(
        self, tenant: str, request: ReservationRequest, reservation_id: str | None, retry: bool
    ) -> Reservation:
        now = now_ms()
        parts = self._group(tenant, request.items)
        rid = reservation_id or self.new_reservation_id(tenant, request)
        if len(parts) == 1:
            return await self._reserve_parts(tenant, request, rid, parts, "", now)
        async with self._lease(parts[0].shard, rid):
            shared = ""
            if retry:
                st, exp = await self.redis.hmget(self.keys.reservation(parts[0].shard, rid), ["st", "exp"])
                if st is not None and st not in (ReservationStatus.HELD, ReservationStatus.PENDING):
                    return await self.get_reservation(tenant, rid)
                if st is not None:
                    shared = str(exp)
            if not shared:
                shared = str(await self._shared_deadline(tenant, request.items, now))
            return await self._reserve_parts(tenant, request, rid, parts, shared, now)

    async def _reserve_split(
        self, tenant: str, request: ReservationRequest, routed: dict[int, Split], rid: str, retry: bool
    ) -> Reservation:
        """Reserves a request naming split SKUs (app/stock/buckets.py): each such line asks its user's
        bucket first, then the next ones; a line no single bucket can cover is spread over the buckets
        that together can. Each try is an ordinary all-or-nothing reservation of bucket lines, under the
        id's token with its first line's shard as home, so every id a request may have used is known: a
        retry finds the one an earlier attempt left and goes on with it instead of holding twice."""
        if retry and (earlier := await self._earlier_split_attempt(tenant, request, routed, rid)) is not None:
            return _for_client(await self._reserve_items(tenant, earlier, self._home_id(tenant, earlier, rid), True))
        orders = {i: bucket_order(request.user_id, split.buckets) for i, split in routed.items()}
        tried = dict.fromkeys(routed, 0)  # line -> how many of its buckets were tried
        while True:
            choice: dict[int, int] = {}
            for i in routed:
                sku = request.items[i].sku
                while tried[i] < len(orders[i]) and self._bucket_known_empty(tenant, sku, orders[i][tried[i]]):
                    tried[i] += 1  # the sold-out fast path, per bucket: no round trip for a bucket known empty
                if tried[i] == len(orders[i]):
                    return await self._reserve_spread(tenant, request, routed, rid)
                choice[i] = orders[i][tried[i]]
            items = [
                ReservationItem.model_construct(sku=bucket_sku(item.sku, choice[i]), quantity=item.quantity)
                if i in choice
                else item
                for i, item in enumerate(request.items)
            ]
            attempt = request.model_copy(update={"items": items})
            try:
                reservation = await self._reserve_items(tenant, attempt, self._home_id(tenant, attempt, rid), False)
                return _for_client(reservation)
            except InsufficientStock as exc:
                short = set(exc.totals)  # the engine's names: buckets
                moved = False
                for i in routed:
                    if items[i].sku in short:
                        tried[i] += 1
                        moved = True
                if not moved:  # a line that is not split is short: no other bucket helps
                    raise

    async def _reserve_spread(
        self, tenant: str, request: ReservationRequest, routed: dict[int, Split], rid: str
    ) -> Reservation:
        """The last try: every split line spread over its buckets by what each has free now, largest first.
        Refused (409 insufficient_stock naming the SKU and the total free over its buckets) when they do
        not have enough together, or when the reservation races others and loses."""
        names = {i: [bucket_sku(request.items[i].sku, b) for b in range(split.buckets)] for i, split in routed.items()}
        free = await self._free_units(tenant, [name for group in names.values() for name in group])
        items: list[ReservationItem] = []
        short: list[dict[str, Any]] = []
        for i, item in enumerate(request.items):
            if i not in routed:
                items.append(item)
                continue
            left = item.quantity
            for name in sorted(names[i], key=lambda n: -free[n]):
                take = min(left, free[name])
                if take > 0:
                    items.append(ReservationItem.model_construct(sku=name, quantity=take))
                    left -= take
            if left > 0:
                short.append({"sku": item.sku, "requested": item.quantity, "available": item.quantity - left})
        if short:
            if self.sold_out is not None:
                for i in routed:
                    for name in names[i]:
                        self.sold_out.learn(tenant, name, free[name])
            text = ", ".join(f"{s['sku']} ({s['available']} available, {s['requested']} requested)" for s in short)
            raise InsufficientStock(f"not enough stock for {text}", totals={}, items=short)
        attempt = request.model_copy(update={"items": items})
        try:
            reservation = await self._reserve_items(tenant, attempt, self._home_id(tenant, attempt, rid), False)
            return _for_client(reservation)
        except InsufficientStock:
            # lost a race for the units just read: tell the client what its SKUs have now
            free = await self._free_units(tenant, [name for group in names.values() for name in group])
            short = [
                {"sku": item.sku, "requested": item.quantity, "available": sum(free[n] for n in names[i])}
                for i, item in enumerate(request.items)
                if i in routed
            ]
            text = ", ".join(f"{s['sku']} ({s['available']} available, {s['requested']} requested)" for s in short)
            raise InsufficientStock(f"not enough stock for {text}", totals={}, items=short) from None

    async def _free_units(self, tenant: str, names: list[str]) -> dict[str, int]:
        """What a hold may take from each of these SKUs now (one pipelined read)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(self.keys.sku(self.keys.shard_of(tenant, name), tenant, name), SKU_STATE_FIELDS)
            rows = await pipe.execute()
        found = zip(names, rows, strict=True)
        return {name: 0 if row[0] is None else sku_state_of(name, row).available_total for name, row in found}

    def _bucket_known_empty(self, tenant: str, sku: str, bucket: int) -> bool:
        return self.sold_out is not None and (tenant, bucket_sku(sku, bucket)) in self.sold_out

    def _home_id(self, tenant: str, request: ReservationRequest, rid: str) -> str:
        return with_home(rid, self.keys.shard_of(tenant, request.items[0].sku))

    async def _earlier_split_attempt(
        self, tenant: str, request: ReservationRequest, routed: dict[int, Split], rid: str
    ) -> ReservationRequest | None:
        """The bucket lines an earlier attempt of this request held under one of its ids, if any."""
        first = request.items[0].sku
        split = routed.get(0)
        homes = {self.keys.shard_of(tenant, bucket_sku(first, b)) for b in range(split.buckets if split else 1)}
        candidates = [with_home(rid, home) for home in sorted(homes)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for candidate, home in zip(candidates, sorted(homes), strict=True):
                pipe.hget(self.keys.reservation(home, candidate), "doc")
            docs = await pipe.execute()
        for doc in docs:
            if doc is not None:
                data = orjson.loads(doc)
                items = [ReservationItem.model_construct(sku=i["sku"], quantity=i["quantity"]) for i in data["items"]]
                return request.model_copy(update={"items": items})
        return None

    async def _reserve_parts(
        self, tenant: str, request: ReservationRequest, rid: str, parts: list[_Part], shared: str, now: int
    ) -> Reservation:
        doc = orjson.dumps(
            {
                "user_id": request.user_id,
                "items": [{"sku": item.sku, "quantity": item.quantity} for item in request.items],
                "channel": request.channel,
            }
        ).decode()
        done: list[_Part] = []
        statuses: list[str] = []
        deadlines: list[int] = []
        backorders: dict[int, tuple[int, int]] = {}  # line index -> (units on backorder, ETA ms)
        already = False
        try:
            for i, part in enumerate(parts):
                reply = await self._call_part(
                    "reserve",
                    tenant,
                    rid,
                    part,
                    [rid, tenant, request.user_id, now, shared, doc if i == 0 else ""],
                    with_quantities=True,
                    tail_args=[
                        *(request.buyer.script_args() if request.buyer else NO_BUYER_ARGS),
                        request.channel or "",
                    ],
                )
                code = int(reply[0])
                if code < 0:
                    raise _script_error(code, reply, part, now=now)
                done.append(part)
                already = already or code == 1
                statuses.append(reply[1])
                deadlines.append(int(reply[2]))
                for (index, _), j in zip(part.lines, range(3, len(reply), 2), strict=False):
                    if int(reply[j]):
                        backorders[index] = (int(reply[j]), int(reply[j + 1]))
        except BaseException as exc:
            if isinstance(exc, InsufficientStock) and self.sold_out is not None:
                for sku, total in exc.totals.items():
                    self.sold_out.learn(tenant, sku, total)
            # A refusal, or an error that leaves the current part's outcome unknown: all-or-nothing, so
            # undo every part done so far, an earlier attempt's included, and the current one (undoing a
            # part that does not exist changes nothing). The lease keeps other calls out meanwhile.
            await self._undo(tenant, rid, parts[: len(done) + 1], now)
            raise
        if already:
            return await self.get_reservation(tenant, rid)
        deadline = min((d for d in deadlines if d), default=0)
        return Reservation(
            id=rid,
            status=combine_statuses(statuses),
            user_id=request.user_id,
            items=[_line(item, *backorders.get(index, (0, 0))) for index, item in enumerate(request.items)],
            channel=request.channel,
            created_at=from_ms(now),
            expires_at=from_ms(deadline) if deadline else None,
        )

    def new_reservation_id(self, tenant: str, request: ReservationRequest) -> str:
        """A fresh id naming the reservation's home shard (its first SKU's)."""
        return new_reservation_id(self.keys.shard_of(tenant, request.items[0].sku))

    async def get_reservation(self, tenant: str, reservation_id: str) -> Reservation:
        return _to_reservation(await self._load(tenant, reservation_id))

    async def confirm(self, tenant: str, reservation_id: str) -> Reservation:
        """Payment arrived: confirm.lua on every part; if one refuses, revert_confirm.lua on the parts
        this call confirmed, so the reservation is confirmed whole or not at all. Operations on one
        reservation spanning shards are serialised by a lease on its home shard."""
        loaded = await self._load(tenant, reservation_id)
        if len(loaded.parts) == 1:
            return await self._confirm_parts(loaded)
        async with self._lease(loaded.parts[0].shard, reservation_id):
            return await self._confirm_parts(loaded)

    async def _confirm_parts(self, loaded: _Loaded) -> Reservation:
        rid, tenant, now = loaded.reservation_id, loaded.tenant, now_ms()
        confirmed_now: list[_Part] = []
        already = False
        emitted: list[tuple[int, str, str]] = []  # (shard, first, last) event ids of each part's confirm
        try:
            for part in loaded.parts:
                reply = await self._call_part("confirm", tenant, rid, part, [rid, now])
                code = int(reply[0])
                if code < 0:
                    raise _script_error(code, reply, part)
                if code == 1:
                    already = True
                else:
                    confirmed_now.append(part)
                if len(reply) > 3 and reply[2]:
                    emitted.append((part.shard, str(reply[2]), str(reply[3])))
            await self._write_through(loaded, emitted)
        except BaseException as exc:
            undo = list(confirmed_now)
            if not isinstance(exc, StockError) and not already and len(confirmed_now) < len(loaded.parts):
                # the failing call's outcome is unknown; with no part confirmed before this call,
                # reverting it is safe (reverting a part that is not confirmed changes nothing)
                undo.append(loaded.parts[len(confirmed_now)])
            # Parts an earlier call confirmed stay confirmed: their events reach PostgreSQL through the
            # worker, and a retry answers 200 once they are there.
            for part in reversed(undo):
                await self._call_part("revert_confirm", tenant, rid, part, [rid, now])
            raise
        # a direct deduction may have taken units on backorder: the answer says so, as later reads do
        backorders = await self._backorders(tenant, rid, loaded.parts)
        return _to_reservation(replace(loaded, backorders=backorders), [ReservationStatus.CONFIRMED])

    async def _write_through(self, loaded: _Loaded, emitted: list[tuple[int, str, str]]) -> None:
        """Makes the confirmation durable: the events each part's confirm emitted (read back by id, one
        pipelined XRANGE per part) go to the SaleLedger in one transaction. An empty range means the
        worker already persisted them and trimmed the stream: they are durable already."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard, first, last in emitted:
                pipe.xrange(self.keys.events(shard), min=first, max=last)
            ranges = await pipe.execute()
        events = [
            e for (shard, _, _), entries in zip(emitted, ranges, strict=True) for e in parse_entries(shard, entries)
        ]
        if not events:
            return
        record = ReservationRecord(
            id=loaded.reservation_id,
            tenant=loaded.tenant,
            user_id=loaded.user_id,
            items=[item.model_dump() for item in loaded.items],
            channel=loaded.channel,
            created_at_ms=loaded.created_at,
            expires_at_ms=loaded.deadline,
        )
        await self.ledger.record_confirmation(events, record)

    async def release(self, tenant: str, reservation_id: str) -> Reservation:
        """The buyer cancels: release.lua on every part (idempotent; a confirmed reservation is refused)."""
        loaded = await self._load(tenant, reservation_id)
        if len(loaded.parts) == 1:
            return await self._release_parts(loaded)
        async with self._lease(loaded.parts[0].shard, reservation_id):
            return await self._release_parts(loaded)

    async def _release_parts(self, loaded: _Loaded) -> Reservation:
        rid, now = loaded.reservation_id, now_ms()
        statuses: list[str] = []
        for part in loaded.parts:
            reply = await self._call_part("release", loaded.tenant, rid, part, [rid, now], mode="release")
            code = int(reply[0])
            if code < 0:
                raise _script_error(code, reply, part)
            statuses.append(reply[1])
        if self.sold_out is not None:
            self.sold_out.forget(loaded.tenant, [item.sku for item in loaded.items])
        # released lines gave their backordered units back: the answer says so, as later reads do
        backorders = await self._backorders(loaded.tenant, rid, loaded.parts)
        return _to_reservation(replace(loaded, backorders=backorders), statuses)

    # -- internals ------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _lease(self, home: int, rid: str) -> AsyncIterator[None]:
        """Serialises operations on one reservation spanning shards (a duplicate payment webhook, a
        release racing a confirm, two requests with one Idempotency-Key), so one call's compensation
        never undoes parts another call counted as done. Single-shard reservations need none: each of
        their operations is one atomic script call. redis-py's Lock: SET NX PX with a token, released
        only by its holder."""
        lock = Lock(self.redis, self.keys.lease(home, rid), timeout=LEASE_SECONDS, blocking_timeout=LEASE_WAIT_SECONDS)
        if not await lock.acquire():
            raise ReservationBusy(
                f"another operation on reservation {rid!r} has been running for over {LEASE_WAIT_SECONDS:g}s; retry"
            )
        try:
            yield
        finally:
            with contextlib.suppress(LockError):  # the lease lapsed: the next holder owns the key now
                await lock.release()

    def _idem_key(self, shard: int, tenant: str, idem: IdempotencyRequest | None) -> str:
        # Without a key the script leaves this one untouched; it still names a key of the same slot.
        if idem is None:
            return self.keys.idempotency(shard, tenant, "-", "-")
        return self.keys.idempotency(shard, tenant, idem.scope, idem.key)

    def _group(self, tenant: str, items: Sequence[ReservationItem]) -> list[_Part]:
        if len(items) == 1:  # most reservations: no grouping to do
            return [_Part(self.keys.shard_of(tenant, items[0].sku), [(0, items[0])])]
        by_shard: dict[int, list[tuple[int, ReservationItem]]] = {}
        for index, item in enumerate(items):
            by_shard.setdefault(self.keys.shard_of(tenant, item.sku), []).append((index, item))
        return [_Part(shard, lines) for shard, lines in by_shard.items()]

    async def _shared_deadline(self, tenant: str, items: Sequence[ReservationItem], now: int) -> int:
        """One deadline for a reservation spanning shards: now + the shortest hold_ttl_seconds of its
        pre_reserve lines (0 when it has none), so its parts expire together."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for item in items:
                shard = self.keys.shard_of(tenant, item.sku)
                pipe.hmget(self.keys.sku(shard, tenant, item.sku), ["mode", "hold_ttl_seconds"])
            rows = await pipe.execute()
        deadline = 0
        for item, (mode, ttl) in zip(items, rows, strict=True):
            if mode is None:
                raise SkuNotFound(f"SKU {item.sku!r} does not exist", sku=item.sku)
            if mode == Mode.PRE_RESERVE:
                line_deadline = now + int(ttl) * 1000
                deadline = line_deadline if deadline == 0 else min(deadline, line_deadline)
        return deadline

    async def _call_part(
        self,
        script: str,
        tenant: str,
        rid: str,
        part: _Part,
        head_args: list[Any],
        *,
        with_quantities: bool = False,
        mode: str | None = None,
        tail_args: Sequence[Any] = (),
    ) -> Any:
        """One part script's call. reserve and release also take each line's hoarding record (the purchase
        policy's cooldown) after the lines' pairs."""
        shard = part.shard
        keys = [self.keys.reservation(shard, rid), self.keys.expiry(shard), self.keys.events(shard)]
        args: list[Any] = [*head_args, len(part.lines)]
        if mode is not None:
            args.append(mode)
        for _, item in part.lines:
            keys.append(self.keys.sku(shard, tenant, item.sku))
            keys.append(self.keys.user_counts(shard, tenant, item.sku))
            args.append(item.sku)
            if with_quantities:
                args.append(item.quantity)
        if script in _WITH_HOARDING_RECORDS:
            keys.extend(self.keys.lapses(shard, tenant, item.sku) for _, item in part.lines)
        keys.extend(self.keys.backorder_queue(shard, tenant, item.sku) for _, item in part.lines)
        keys.extend(self.keys.channels(shard, tenant, item.sku) for _, item in part.lines)
        keys.append(self.keys.ready(shard))
        args.extend(tail_args)
        return await self.scripts.call(script, keys, args)

    async def _backorders(self, tenant: str, rid: str, parts: list[_Part]) -> dict[str, tuple[int, int]]:
        """Each line's units on backorder (its part's `b:<sku>`) and its SKU's presale ETA: one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in parts:
                for _, item in part.lines:
                    pipe.hget(self.keys.reservation(part.shard, rid), f"b:{item.sku}")
                    pipe.hget(self.keys.sku(part.shard, tenant, item.sku), "presale_eta")
            values = await pipe.execute()
        skus = [item.sku for part in parts for _, item in part.lines]
        found = zip(skus, values[0::2], values[1::2], strict=True)
        return {sku: (int(units), int(eta or 0)) for sku, units, eta in found if units and int(units)}

    async def _undo(self, tenant: str, rid: str, done: list[_Part], now: int) -> None:
        for part in reversed(done):
            await self._call_part("release", tenant, rid, part, [rid, now], mode="undo")

    async def _load(self, tenant: str, reservation_id: str) -> _Loaded:
        home = home_shard_of(reservation_id, self.keys.shard_count)
        if home is None:
            raise ReservationNotFound(f"reservation {reservation_id!r} does not exist")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.ready(home))
            pipe.hmget(self.keys.reservation(home, reservation_id), ["st", "t", "exp", "c", "doc"])
            ready, (st, owner, deadline, created, doc) = await pipe.execute()
        if not ready:
            raise NotReady.for_shard(home)
        if st is None or doc is None or owner != tenant:
            raise ReservationNotFound(f"reservation {reservation_id!r} does not exist")
        data = orjson.loads(doc)
        # stored by this service, so valid; a split SKU's lines name its buckets, outside the API's alphabet
        items = [ReservationItem.model_construct(sku=i["sku"], quantity=i["quantity"]) for i in data["items"]]
        parts = self._group(tenant, items)
        statuses = [str(st)]
        if len(parts) > 1:
            async with self.redis.pipeline(transaction=False) as pipe:
                for part in parts[1:]:
                    pipe.exists(self.keys.ready(part.shard))
                    pipe.hget(self.keys.reservation(part.shard, reservation_id), "st")
                replies = await pipe.execute()
            for part, ready_there in zip(parts[1:], replies[0::2], strict=True):
                if not ready_there:
                    raise NotReady.for_shard(part.shard)
            statuses += [str(s) for s in replies[1::2] if s is not None]
        return _Loaded(
            backorders=await self._backorders(tenant, reservation_id, parts),
            reservation_id=reservation_id,
            tenant=tenant,
            user_id=data["user_id"],
            items=items,
            channel=data.get("channel"),
            created_at=int(str(created)),
            deadline=int(str(deadline)),
            parts=parts,
            statuses=statuses,
        )


def sku_state_of(
    sku: str, values: Sequence[Any], channels: Mapping[str, str] | None = None, channel: str | None = None
) -> SkuState:
    """A SkuState from SKU_STATE_FIELDS' values (a script's reply or an HMGET; values past them are
    ignored) and the SKU's channels hash; `available` for a reservation naming `channel`. Policy and
    presale values may be missing or None: a SKU, or an idempotency record, from before purchase
    policies or presales has none."""
    on_hand, safety, held, sold = (int(v) for v in values[:4])
    limit = int(values[6])
    tail = [int(v or 0) for v in values[7 : len(SKU_STATE_FIELDS)]]
    tail += [0] * (len(SKU_STATE_FIELDS) - 7 - len(tail))
    policy, (backordered, cap, eta, ends) = tail[: len(POLICY_FIELDS)], tail[len(POLICY_FIELDS) :]
    now = now_ms()
    total = available_units(on_hand, safety, held, sold, backordered, cap, ends, now)
    pre = presale_free(backordered, cap, ends, now)
    shared, states = channel_states(channels or {}, total - pre, pre)
    available = next((c.available for c in states if c.channel == channel), shared + pre)
    return SkuState(
        sku=sku,
        on_hand=on_hand,
        safety_stock=safety,
        held=held,
        sold=sold,
        available=available,
        channel=channel,
        available_total=total,
        channels=states,
        mode=Mode(values[4]),
        hold_ttl_seconds=int(values[5]),
        per_user_limit=limit or None,
        backordered=backordered,
        presale=presale_state([cap, eta, ends], backordered, now),
        **policy_from_flat(policy),
    )


def _line(item: ReservationItem, backordered: int, eta_ms: int) -> ReservationLine:
    if not backordered:
        return ReservationLine(sku=item.sku, quantity=item.quantity)
    eta = from_ms(eta_ms) if eta_ms else None
    return ReservationLine(sku=item.sku, quantity=item.quantity, backorder=True, backordered=backordered, eta=eta)


def _for_client(reservation: Reservation) -> Reservation:
    """A reservation with its bucket lines shown as the split SKUs' lines (one per SKU, quantities summed)."""
    if not any(is_bucket(line.sku) for line in reservation.items):
        return reservation
    merged: dict[str, ReservationLine] = {}
    for line in reservation.items:
        name = parent_sku(line.sku)
        if name in merged:
            merged[name].quantity += line.quantity
        else:
            merged[name] = line.model_copy(update={"sku": name})
    return reservation.model_copy(update={"items": list(merged.values())})


def _to_reservation(loaded: _Loaded, statuses: Sequence[str] | None = None) -> Reservation:
    return _for_client(_reservation_of(loaded, statuses))


def _reservation_of(loaded: _Loaded, statuses: Sequence[str] | None = None) -> Reservation:
    return Reservation(
        id=loaded.reservation_id,
        status=combine_statuses(statuses or loaded.statuses),
        user_id=loaded.user_id,
        items=[_line(i, *loaded.backorders.get(i.sku, (0, 0))) for i in loaded.items],
        channel=loaded.channel,
        created_at=from_ms(loaded.created_at),
        expires_at=from_ms(loaded.deadline) if loaded.deadline else None,
    )


def _script_error(
    code: int, reply: Sequence[Any], part: _Part | None = None, sku: str = "", shard: int = -1, now: int = 0
) -> StockError:
    """The one place a script's negative reply becomes a domain error; line numbers become SKU names."""

    def item(line: Any) -> ReservationItem:
        """The line as the client named it: a split SKU's bucket answers under the SKU's name."""
        assert part is not None
        engine = part.lines[int(line) - 1][1]
        if not is_bucket(engine.sku):
            return engine
        return ReservationItem.model_construct(sku=parent_sku(engine.sku), quantity=engine.quantity)

    if code == ScriptCode.NOT_READY:
        return NotReady.for_shard(part.shard if part is not None else shard)
    if code == ScriptCode.SKU_NOT_FOUND:
        name = item(reply[1]).sku if part is not None else sku
        return SkuNotFound(f"SKU {name!r} does not exist", sku=name)
    if code == ScriptCode.INSUFFICIENT_STOCK:
        # (line, available to it, available to anyone): the problem document shows the first two; the
        # sold-out fast path learns from the third (a channel's quota used up is not the SKU sold out)
        triples = range(1, len(reply), 3)
        short = [
            {"sku": item(reply[i]).sku, "requested": item(reply[i]).quantity, "available": int(reply[i + 1])}
            for i in triples
        ]
        assert part is not None
        totals = {part.lines[int(reply[i]) - 1][1].sku: int(reply[i + 2]) for i in triples}  # the engine's names
        names = ", ".join(f"{s['sku']} ({s['available']} available, {s['requested']} requested)" for s in short)
        return InsufficientStock(f"not enough stock for {names}", totals=totals, items=short)
    if code == ScriptCode.LIMIT_EXCEEDED:
        line, limit, units = item(reply[1]), int(reply[2]), int(reply[3])
        return LimitExceeded(
            f"user may have at most {limit} of SKU {line.sku!r}; they have {units} and asked for {line.quantity}",
            rule="per_user_limit",
            sku=line.sku,
            limit=limit,
            units=units,
            requested=line.quantity,
        )
    if code == ScriptCode.ORDER_LIMIT:
        line, limit = item(reply[1]), int(reply[2])
        return LimitExceeded(
            f"one reservation may hold at most {limit} of SKU {line.sku!r}; it asked for {line.quantity}",
            rule="max_per_order",
            sku=line.sku,
            limit=limit,
            requested=line.quantity,
        )
    if code == ScriptCode.NOT_ELIGIBLE:
        line, rule, minimum = item(reply[1]), str(reply[2]), int(reply[3])
        fact = None if reply[4] == "" else int(reply[4])
        fact_name = dict(ELIGIBILITY_RULES)[rule]
        told = "the checkout did not send it" if fact is None else f"the buyer has {fact}"
        return NotEligible(
            f"SKU {line.sku!r} requires {fact_name} >= {minimum} ({rule}); {told}",
            sku=line.sku,
            rule=rule,
            required=minimum,
            actual=fact,
        )
    if code == ScriptCode.HOLD_COOLDOWN:
        line, until = item(reply[1]), int(reply[2])
        seconds = max(1, -(-(until - now) // 1000))  # rounded up: retrying earlier is refused again
        return HoldCooldown(
            f"this user's holds on SKU {line.sku!r} lapsed too often; no new hold for {seconds} s",
            retry_after=seconds,
            sku=line.sku,
            until=from_ms(until).isoformat(),
        )
    if code == ScriptCode.STOCK_CONFLICT:
        held, sold = int(reply[1]), int(reply[2])
        backordered = int(reply[3]) if len(reply) > 3 else 0
        if len(reply) > 4 and reply[4] == "presale_cap":
            return StockConflict(
                f"the presale cap of SKU {sku!r} may not fall below the {backordered} units already backordered"
                " (removing the presale counts as a cap of 0); a receipt fills them",
                held=held,
                sold=sold,
                backordered=backordered,
                field="presale.cap",
            )
        promised = f"held + sold ({held} + {sold})"
        if backordered:
            promised = f"held + sold - backordered ({held} + {sold} - {backordered})"
        return StockConflict(
            f"on_hand - safety_stock may not fall below {promised} for SKU {sku!r}",
            held=held,
            sold=sold,
            backordered=backordered,
            field="on_hand",
        )
    if code == ScriptCode.IDEMPOTENCY_CONFLICT:
        return IdempotencyConflict("this Idempotency-Key was already used with a different request; use a new key")
    if code == ScriptCode.RESERVATION_NOT_FOUND:
        return ReservationNotFound("reservation does not exist")
    if code == ScriptCode.RESERVATION_RELEASED:
        return ReservationReleased("the reservation was released; its stock went back on sale")
    if code == ScriptCode.RESERVATION_CONFIRMED:
        return ReservationConfirmed("the reservation is confirmed (paid); it can no longer be released")
    raise RuntimeError(f"unexpected script reply {list(reply)!r}")
