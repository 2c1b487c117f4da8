"""The stock state PostgreSQL implies, shard by shard: what Redis must hold after a rebuild, and what
reconcile compares Redis against.

Counters are recomputed from the reservations rather than copied from the last event's "after" values:
``held`` is the sum of the held lines of held parts, ``sold`` of the lines of confirmed parts, and each
user's units likewise, so a hold whose events never reached PostgreSQL cannot leave units held forever.
``backordered`` is the sum of those lines' backordered units, and each sales channel's ``used`` the sum of
its reservations' lines' units from its quota. ``on_hand`` and the settings, the presale's
included, are the SKU row's (the newest persisted event's).

A rebuilt shard must keep invariant 1. A hold persisted as live whose release was lost with Redis could
push what is promised from stock on hand (``held + sold - backordered``) above ``on_hand - safety_stock``,
or the backordered units above the presale's cap; confirmed sales are facts, holds are not, so the newest
such holds are dropped (expired, with their events) until every SKU fits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from app.stock.keys import KeySpace
from app.stock.policy import POLICY_FIELDS
from app.stock.presale import PRESALE_FIELDS
from app.stock.reservation_ids import home_shard_of

SkuKey = tuple[str, str]  # (tenant, sku)

LOAD_SKUS = """
SELECT tenant, sku, on_hand, safety_stock, mode, hold_ttl_seconds, per_user_limit, policy, presale FROM sku
"""
LOAD_LISTINGS = "SELECT tenant, listing, components::text AS components FROM listing"
LOAD_CHANNELS = "SELECT tenant, sku, channel, quota, priority, borrow FROM sku_channel"
LOAD_LINES = """
SELECT reservation_id, sku, shard, tenant, user_id, quantity, held, status, status_before, confirmed_how,
       expires_at_ms, created_at_ms, event_ms, event_seq, backordered, from_quota
FROM reservation_line
"""
LOAD_DOCS = """
SELECT id, user_id, channel, items, (extract(epoch FROM created_at) * 1000)::bigint AS created_at_ms,
       (extract(epoch FROM expires_at) * 1000)::bigint AS expires_at_ms
FROM reservation WHERE id = ANY($1::text[])
"""


@dataclass
class ChannelImage:
    quota: int
    priority: int
    borrow: bool
    used: int = 0

    def fields(self, name: str) -> dict[str, int]:
        """The channel's fields in the SKU's channels hash (lua/includes/channels.lua)."""
        return {
            f"q:{name}": self.quota,
            f"u:{name}": self.used,
            f"p:{name}": self.priority,
            f"b:{name}": int(self.borrow),
        }


@dataclass
class SkuImage:
    tenant: str
    sku: str
    on_hand: int
    safety_stock: int
    mode: str
    hold_ttl_seconds: int
    per_user_limit: int  # 0: none
    policy: dict[str, int] = field(default_factory=dict)  # POLICY_FIELDS, 0 = rule off
    presale_cap: int = 0  # 0: no presale
    presale_eta: int = 0
    presale_ends_at: int = 0
    held: int = 0
    sold: int = 0
    backordered: int = 0
    channels: dict[str, ChannelImage] = field(default_factory=dict)

    @property
    def cap(self) -> int:
        return self.on_hand - self.safety_stock

    @property
    def from_on_hand(self) -> int:
        """Units promised from stock on hand (invariant 1: at most ``cap``)."""
        return self.held + self.sold - self.backordered

    def fits(self) -> bool:
        return self.from_on_hand <= self.cap and self.backordered <= self.presale_cap


@dataclass
class LineImage:
    sku: str
    quantity: int
    held: bool
    backordered: int = 0  # units on backorder while the line holds or is sold
    from_quota: int = 0  # units from its reservation's channel's quota while the line holds or is sold


@dataclass
class PartImage:
    reservation_id: str
    shard: int
    tenant: str
    user_id: str
    status: str
    deadline: int
    created_at: int
    lines: list[LineImage]
    status_before: str | None = None
    confirmed_how: str | None = None
    doc: str | None = None  # on the home part only
    channel: str | None = None  # the reservation's
    dropped: bool = False  # expired by the rebuild to restore invariant 1

    def units(self, line: LineImage) -> tuple[int, int, int, int]:
        """What the line counts for while the part is in its status: (held, sold, user units, backordered)."""
        if self.status == "held" and line.held:
            return line.quantity, 0, line.quantity, line.backordered
        if self.status == "confirmed":
            return 0, line.quantity, line.quantity, line.backordered
        return 0, 0, 0, 0

    def backordered(self, line: LineImage) -> int:
        return self.units(line)[3]


@dataclass
class ShardImage:
    shard: int
    skus: dict[SkuKey, SkuImage] = field(default_factory=dict)
    parts: list[PartImage] = field(default_factory=list)
    users: dict[SkuKey, dict[str, int]] = field(default_factory=dict)
    raised: dict[SkuKey, int] = field(default_factory=dict)  # on_hand raised to cover sales (see below)
    listings: dict[tuple[str, str], str] = field(default_factory=dict)  # (tenant, listing) -> components JSON

    def expiry(self) -> dict[str, int]:
        return {p.reservation_id: p.deadline for p in self.parts if p.status in ("held", "pending") and p.deadline > 0}

    def backorder_queues(self) -> dict[SkuKey, dict[str, int]]:
        """Per SKU, the reservations whose line has units on backorder -> when it took them (the part's
        creation: a direct deduction's own moment is not persisted, and it only ever follows a lapse)."""
        queues: dict[SkuKey, dict[str, int]] = {}
        for part in self.parts:
            for line in part.lines:
                if part.backordered(line):
                    queues.setdefault((part.tenant, line.sku), {})[part.reservation_id] = part.created_at
        return queues


def _policy(stored: str | dict[str, object]) -> dict[str, int]:
    """The policy's POLICY_FIELDS from the sku.policy column (asyncpg hands jsonb over as text); a field
    missing (a SKU from before the rule existed) is 0: off."""
    values = orjson.loads(stored) if isinstance(stored, str) else stored
    return {f: int(str(values.get(f) or 0)) for f in POLICY_FIELDS}


def _presale(stored: str | dict[str, object] | None) -> tuple[int, int, int]:
    """The presale's PRESALE_FIELDS (cap, eta, ends_at) from the sku.presale column (NULL: none, all 0)."""
    values = (orjson.loads(stored) if isinstance(stored, str) else stored) or {}
    cap, eta, ends = (int(str(values.get(f) or 0)) for f in PRESALE_FIELDS)
    return cap, eta, ends


async def load_images(pg: asyncpg.Pool, keys: KeySpace, shards: Iterable[int]) -> dict[int, ShardImage]:
    wanted = set(shards)
    images = {s: ShardImage(s) for s in wanted}
    async with pg.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        sku_rows = await conn.fetch(LOAD_SKUS)
        channel_rows = await conn.fetch(LOAD_CHANNELS)
        listing_rows = await conn.fetch(LOAD_LISTINGS)
        line_rows = await conn.fetch(LOAD_LINES)
        by_part: dict[tuple[str, int], list[asyncpg.Record]] = {}
        lines_of: dict[str, list[asyncpg.Record]] = {}
        for row in line_rows:
            by_part.setdefault((row["reservation_id"], row["shard"]), []).append(row)
            lines_of.setdefault(row["reservation_id"], []).append(row)
        ids = [rid for (rid, shard) in by_part if shard in wanted]
        docs = {r["id"]: r for r in await conn.fetch(LOAD_DOCS, ids)}

    for row in sku_rows:
        shard = keys.shard_of(row["tenant"], row["sku"])
        if shard in wanted:
            images[shard].skus[(row["tenant"], row["sku"])] = SkuImage(
                row["tenant"],
                row["sku"],
                row["on_hand"],
                row["safety_stock"],
                row["mode"],
                row["hold_ttl_seconds"],
                row["per_user_limit"] or 0,
                _policy(row["policy"]),
                *_presale(row["presale"]),
            )
    for row in channel_rows:
        shard = keys.shard_of(row["tenant"], row["sku"])
        sku_image = images[shard].skus.get((row["tenant"], row["sku"])) if shard in wanted else None
        if sku_image is not None:
            sku_image.channels[row["channel"]] = ChannelImage(row["quota"], row["priority"], row["borrow"])
    for row in listing_rows:
        shard = keys.shard_of(row["tenant"], row["listing"])
        if shard in wanted:
            # compact, as app/stock/listings.py writes it (jsonb's text form has spaces)
            components = orjson.dumps(orjson.loads(row["components"])).decode()
            images[shard].listings[(row["tenant"], row["listing"])] = components
    for (rid, shard), rows in by_part.items():
        if shard not in wanted:
            continue
        part = _part(rid, shard, rows, docs.get(rid))
        if part is None:
            continue
        if home_shard_of(rid, keys.shard_count) == shard:
            part.doc = _doc(docs.get(rid), lines_of[rid], part.user_id)
        images[shard].parts.append(part)
    for image in images.values():
        _count(image)
        _drop_surplus_holds(image)
    return images


def _part(rid: str, shard: int, rows: list[asyncpg.Record], doc: asyncpg.Record | None) -> PartImage | None:
    # All lines of a part share its status; should a crash have split one script's events across two
    # batches, the newest line speaks for the part.
    newest = max(rows, key=lambda r: (r["event_ms"], r["event_seq"]))
    if newest["status"] == "undone":
        return None  # compensated: the part never happened
    # Times come from the part's reserve events; when only its confirm was persisted (written through
    # before the worker reached the hold), from the reservation's document, which the confirm wrote.
    created = min((r["created_at_ms"] for r in rows if r["created_at_ms"] is not None), default=None)
    if created is None:
        created = doc["created_at_ms"] if doc is not None else newest["event_ms"]
    deadlines = [r["expires_at_ms"] for r in rows if r["expires_at_ms"] is not None]
    deadline = max(deadlines) if deadlines else (doc["expires_at_ms"] or 0 if doc is not None else 0)
    return PartImage(
        reservation_id=rid,
        shard=shard,
        tenant=newest["tenant"],
        user_id=newest["user_id"],
        status=newest["status"],
        deadline=deadline,
        created_at=created,
        lines=[
            LineImage(r["sku"], r["quantity"], r["held"], r["backordered"], r["from_quota"])
            for r in sorted(rows, key=lambda r: r["sku"])
        ],
        status_before=newest["status_before"],
        confirmed_how=newest["confirmed_how"],
        channel=doc["channel"] if doc is not None else None,
    )


def _doc(row: asyncpg.Record | None, lines: list[asyncpg.Record], user_id: str) -> str:
    """The reservation document the home part carries: PostgreSQL's copy, or, when only some of its
    events were persisted, one made from the lines known (items in SKU order, channel unknown)."""
    if row is not None:
        items: Any = row["items"]
        items = orjson.loads(items) if isinstance(items, str) else items
        return orjson.dumps({"user_id": row["user_id"], "items": items, "channel": row["channel"]}).decode()
    items = [{"sku": r["sku"], "quantity": r["quantity"]} for r in sorted(lines, key=lambda r: r["sku"])]
    return orjson.dumps({"user_id": user_id, "items": items, "channel": None}).decode()


def _count(image: ShardImage) -> None:
    for counted in image.skus.values():
        counted.held = counted.sold = counted.backordered = 0
        for channel in counted.channels.values():
            channel.used = 0
    image.users = {}
    for part in image.parts:
        for line in part.lines:
            held, sold, units, backordered = part.units(line)
            sku = image.skus.get((part.tenant, line.sku))
            if sku is None:  # a line of a SKU whose catalogue row is missing: keep it visible as 0-stock
                sku = SkuImage(part.tenant, line.sku, 0, 0, "pre_reserve", 900, 0)
                image.skus[(part.tenant, line.sku)] = sku
            sku.held += held
            sku.sold += sold
            sku.backordered += backordered
            if units and part.channel in sku.channels:
                sku.channels[part.channel].used += line.from_quota
            if units:
                per_user = image.users.setdefault((part.tenant, line.sku), {})
                per_user[part.user_id] = per_user.get(part.user_id, 0) + units


def _helps(line: LineImage, sku: str, state: SkuImage) -> bool:
    """Whether dropping this held line brings the SKU nearer to fitting invariant 1."""
    on_hand_over, cap_over = state.from_on_hand > state.cap, state.backordered > state.presale_cap
    return (
        line.sku == sku
        and line.held
        and ((on_hand_over and line.quantity > line.backordered) or (cap_over and line.backordered > 0))
    )


def _drop_surplus_holds(image: ShardImage) -> None:
    while True:
        over = [k for k, s in image.skus.items() if not s.fits()]
        if not over:
            return
        tenant, sku = over[0]
        state = image.skus[(tenant, sku)]
        candidates = [
            p
            for p in image.parts
            if p.status == "held" and p.tenant == tenant and any(_helps(ln, sku, state) for ln in p.lines)
        ]
        if not candidates:
            # sales alone exceed on_hand (or the presale's cap): the catalogue row is older than the sales
            # (its event was lost); raise on_hand (the cap) to what was sold rather than report stock that
            # does not exist as available
            short = image.skus[(tenant, sku)]
            if short.from_on_hand > short.cap:
                delta = short.from_on_hand - short.cap
                short.on_hand += delta
                image.raised[(tenant, sku)] = image.raised.get((tenant, sku), 0) + delta
            short.presale_cap = max(short.presale_cap, short.backordered)
            continue
        newest = max(candidates, key=lambda p: p.created_at)
        newest.status, newest.dropped = "expired", True
        _count(image)
