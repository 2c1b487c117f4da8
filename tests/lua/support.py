"""Direct callers of the Lua scripts for tests/lua: the same KEYS / ARGV layout as StockService._call_part
and ExpirySweeper._expire (the shard's ready marker last), every key name built by KeySpace."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.stock.policy import POLICY_FIELDS
from app.stock.reservation_ids import new_reservation_id
from app.store.scripts import Scripts

TENANT = "default"
NOW = 1_700_000_000_000  # a fixed "now" (ms): deadlines are exact
FAR_FUTURE = 4_000_000_000_000  # past every deadline a test creates
IDEM_TTL = 3600
NO_POLICY = (0,) * len(POLICY_FIELDS)  # set_sku / adjust replies hold the policy's 7 fields
NO_PRESALE = (0, 0, 0)  # set_sku's presale arguments: none
NO_PRESALE_STATE = (0, 0, 0, 0)  # replies end with backordered and the presale's 3 fields: none


def skus_on_one_shard(keys: KeySpace, prefix: str, count: int) -> list[str]:
    """`count` SKU names that all land on one shard (the shard of `<prefix>-0`)."""
    found: list[str] = []
    shard: int | None = None
    i = 0
    while len(found) < count:
        name = f"{prefix}-{i}"
        i += 1
        name_shard = keys.shard_of(TENANT, name)
        if shard is None:
            shard = name_shard
        if name_shard == shard:
            found.append(name)
    return found


def shard_of(keys: KeySpace, skus: Sequence[str]) -> int:
    shards = {keys.shard_of(TENANT, sku) for sku in skus}
    assert len(shards) == 1, f"test setup: {skus} span shards {shards}"
    return shards.pop()


def new_id(keys: KeySpace, sku: str) -> str:
    return new_reservation_id(keys.shard_of(TENANT, sku))


def idem_key(keys: KeySpace, sku: str, scope: str = "-", key: str = "-") -> str:
    """An idempotency record in the SKU's slot, as StockService._idem_key builds it."""
    return keys.idempotency(keys.shard_of(TENANT, sku), TENANT, scope, key)


# -- script calls ---------------------------------------------------------------------------------------


async def set_sku(
    scripts: Scripts,
    keys: KeySpace,
    sku: str,
    on_hand: int,
    *,
    safety: int = 0,
    mode: str = "pre_reserve",
    ttl: int = 900,
    limit: int = 0,
    now: int = NOW,
    fingerprint: str = "",
    idem: str | None = None,
    policy: Sequence[int] = NO_POLICY,
    presale: Sequence[int] = NO_PRESALE,
) -> Any:
    """`policy`: the 7 POLICY_FIELDS of app/stock/policy.py, 0 = rule off; `presale`: cap, ETA (ms), end
    (ms, 0 = none), cap 0 = no presale."""
    shard = keys.shard_of(TENANT, sku)
    return await scripts.call(
        "set_sku",
        [keys.sku(shard, TENANT, sku), keys.events(shard), idem or idem_key(keys, sku), keys.ready(shard)],
        [TENANT, sku, on_hand, safety, mode, ttl, limit, now, fingerprint, IDEM_TTL, *policy, *presale],
    )


async def adjust(
    scripts: Scripts,
    keys: KeySpace,
    sku: str,
    delta: int,
    *,
    reason: str = "count",
    now: int = NOW,
    fingerprint: str = "",
    idem: str | None = None,
) -> Any:
    shard = keys.shard_of(TENANT, sku)
    return await scripts.call(
        "adjust_stock",
        [keys.sku(shard, TENANT, sku), keys.events(shard), idem or idem_key(keys, sku), keys.ready(shard)],
        [TENANT, sku, delta, now, reason, fingerprint, IDEM_TTL],
    )


def _part_layout(keys: KeySpace, rid: str, skus: Sequence[str], *, hoarding: bool = False) -> list[str]:
    """KEYS of a call on one reservation part, as StockService._call_part lays them out (reserve and
    release take each line's hoarding record after the lines' pairs; every part script then takes each
    line's backorder queue)."""
    shard = shard_of(keys, skus)
    layout = [keys.reservation(shard, rid), keys.expiry(shard), keys.events(shard)]
    for sku in skus:
        layout += [keys.sku(shard, TENANT, sku), keys.user_counts(shard, TENANT, sku)]
    if hoarding:
        layout += [keys.lapses(shard, TENANT, sku) for sku in skus]
    layout += [keys.backorder_queue(shard, TENANT, sku) for sku in skus]
    layout += [keys.channels(shard, TENANT, sku) for sku in skus]
    return [*layout, keys.ready(shard)]


async def reserve(
    scripts: Scripts,
    keys: KeySpace,
    rid: str,
    user: str,
    lines: Sequence[tuple[str, int]],
    *,
    now: int = NOW,
    deadline: str | int = "",
    doc: str = "",
    buyer: Sequence[int | str] = ("", "", ""),
    channel: str = "",
) -> Any:
    """`buyer`: account_age_days, orders_count, member_days ('' = not sent); `channel`: '' for none."""
    layout = _part_layout(keys, rid, [sku for sku, _ in lines], hoarding=True)
    args: list[Any] = [rid, TENANT, user, now, deadline, doc, len(lines)]
    for sku, qty in lines:
        args += [sku, qty]
    return await scripts.call("reserve", layout, [*args, *buyer, channel])


async def confirm(scripts: Scripts, keys: KeySpace, rid: str, skus: Sequence[str], *, now: int = NOW) -> Any:
    layout = _part_layout(keys, rid, skus)
    return await scripts.call("confirm", layout, [rid, now, len(skus), *skus])


async def revert_confirm(scripts: Scripts, keys: KeySpace, rid: str, skus: Sequence[str], *, now: int = NOW) -> Any:
    layout = _part_layout(keys, rid, skus)
    return await scripts.call("revert_confirm", layout, [rid, now, len(skus), *skus])


async def release(
    scripts: Scripts, keys: KeySpace, rid: str, skus: Sequence[str], *, how: str = "release", now: int = NOW
) -> Any:
    layout = _part_layout(keys, rid, skus, hoarding=True)
    return await scripts.call("release", layout, [rid, now, len(skus), how, *skus])


async def expire_holds(
    scripts: Scripts, keys: KeySpace, shard: int, batch: Sequence[tuple[str, Sequence[str]]], *, now: int
) -> Any:
    """One expire_holds call on `shard` for (reservation id, its skus) pairs, laid out as the sweeper does."""
    layout = [keys.expiry(shard), keys.events(shard)]
    args: list[Any] = [now, len(batch)]
    for rid, skus in batch:
        layout.append(keys.reservation(shard, rid))
        for sku in skus:
            layout += [keys.sku(shard, TENANT, sku), keys.user_counts(shard, TENANT, sku)]
        layout += [keys.lapses(shard, TENANT, sku) for sku in skus]
        layout += [keys.backorder_queue(shard, TENANT, sku) for sku in skus]
        layout += [keys.channels(shard, TENANT, sku) for sku in skus]
        args += [rid, len(skus), *skus]
    return await scripts.call("expire_holds", [*layout, keys.ready(shard)], args)


async def receive(
    scripts: Scripts,
    keys: KeySpace,
    sku: str,
    qty: int,
    queued: Sequence[str],
    *,
    now: int = NOW,
    reason: str = "receipt",
    fingerprint: str = "",
) -> Any:
    """receive_stock naming the parts of `queued` (reservation ids, as the caller read the queue's head)."""
    shard = keys.shard_of(TENANT, sku)
    layout = [keys.sku(shard, TENANT, sku), keys.backorder_queue(shard, TENANT, sku), keys.events(shard)]
    layout += [idem_key(keys, sku), *(keys.reservation(shard, rid) for rid in queued), keys.ready(shard)]
    args = [TENANT, sku, qty, now, reason, fingerprint, IDEM_TTL, len(queued), *queued]
    return await scripts.call("receive_stock", layout, args)


async def set_channel(
    scripts: Scripts,
    keys: KeySpace,
    sku: str,
    channel: str,
    quota: int,
    *,
    priority: int = 0,
    borrow: bool = True,
    now: int = NOW,
    max_channels: int = 20,
) -> Any:
    shard = keys.shard_of(TENANT, sku)
    layout = [keys.sku(shard, TENANT, sku), keys.channels(shard, TENANT, sku), keys.events(shard)]
    layout += [idem_key(keys, sku), keys.ready(shard)]
    args = [TENANT, sku, channel, quota, priority, 1 if borrow else 0, now, "", IDEM_TTL, max_channels]
    return await scripts.call("set_channel", layout, args)


async def channel_used(redis: Redis, keys: KeySpace, sku: str, channel: str) -> int:
    return int(await redis.hget(keys.channels(keys.shard_of(TENANT, sku), TENANT, sku), f"u:{channel}") or 0)


async def backorder_queue(redis: Redis, keys: KeySpace, sku: str) -> list[str]:
    return [str(m) for m in await redis.zrange(keys.backorder_queue(keys.shard_of(TENANT, sku), TENANT, sku), 0, -1)]


async def claim(scripts: Scripts, record: str, fingerprint: str, ref: str, ttl: int = IDEM_TTL) -> Any:
    return await scripts.call("claim_idempotency", [record], [fingerprint, ref, ttl])


async def race(*groups: Sequence[Awaitable[Any]], seed: int = 1) -> list[list[Any]]:
    """Runs every call of every group concurrently, submitted in a shuffled order so that the groups really
    interleave; returns each group's replies in the group's own order."""
    tagged = [(g, i, call) for g, group in enumerate(groups) for i, call in enumerate(group)]
    random.Random(seed).shuffle(tagged)
    replies = await asyncio.gather(*(call for _, _, call in tagged))
    out: list[list[Any]] = [[None] * len(group) for group in groups]
    for (g, i, _), reply in zip(tagged, replies, strict=True):
        out[g][i] = reply
    return out


# -- reading state --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    on_hand: int
    safety: int
    held: int
    sold: int
    backordered: int = 0
    cap: int = 0  # the presale's, 0 = none

    @property
    def available(self) -> int:
        """On hand, then on backorder (an open presale: the tests' presales have no end)."""
        on_hand = max(0, self.on_hand - self.safety - (self.held + self.sold - self.backordered))
        return on_hand + max(0, self.cap - self.backordered)

    def check_invariant(self) -> None:
        assert self.held >= 0, self
        assert self.sold >= 0, self
        assert 0 <= self.backordered <= self.cap, self
        assert self.held + self.sold - self.backordered <= self.on_hand - self.safety, self


async def counters(redis: Redis, keys: KeySpace, sku: str) -> Counters:
    shard = keys.shard_of(TENANT, sku)
    fields = ["on_hand", "safety_stock", "held", "sold", "backordered", "presale_cap"]
    values = await redis.hmget(keys.sku(shard, TENANT, sku), fields)
    assert values[0] is not None, f"SKU {sku} does not exist"
    return Counters(*(int(v or 0) for v in values))


async def sku_hash(redis: Redis, keys: KeySpace, sku: str) -> dict[str, str]:
    return await redis.hgetall(keys.sku(keys.shard_of(TENANT, sku), TENANT, sku))  # type: ignore[no-any-return,misc]


async def user_units(redis: Redis, keys: KeySpace, sku: str) -> dict[str, int]:
    raw = await redis.hgetall(keys.user_counts(keys.shard_of(TENANT, sku), TENANT, sku))  # type: ignore[misc]
    return {user: int(units) for user, units in raw.items()}


async def part(redis: Redis, keys: KeySpace, rid: str, sku: str) -> dict[str, str]:
    return await redis.hgetall(keys.reservation(keys.shard_of(TENANT, sku), rid))  # type: ignore[no-any-return,misc]


async def expiry_index(redis: Redis, keys: KeySpace, shard: int) -> dict[str, int]:
    return {rid: int(score) for rid, score in await redis.zrange(keys.expiry(shard), 0, -1, withscores=True)}


async def events(redis: Redis, keys: KeySpace, shard: int) -> list[dict[str, str]]:
    return [fields for _, fields in await redis.xrange(keys.events(shard))]


async def events_of(redis: Redis, keys: KeySpace, sku: str) -> list[dict[str, str]]:
    return [e for e in await events(redis, keys, keys.shard_of(TENANT, sku)) if e["sku"] == sku]


def counters_of(event: dict[str, str]) -> tuple[int, int, int]:
    """(on_hand, held, sold) an event reports: the SKU's counters after its change."""
    return int(event["on_hand"]), int(event["held"]), int(event["sold"])


async def assert_ledger_matches(redis: Redis, keys: KeySpace, sku: str) -> None:
    """The SKU's last event carries its current counters, and on_hand replays from sku_set/adjusted qtys."""
    ledger = await events_of(redis, keys, sku)
    now = await counters(redis, keys, sku)
    assert counters_of(ledger[-1]) == (now.on_hand, now.held, now.sold)
    assert sum(int(e["qty"]) for e in ledger if e["type"] in ("sku_set", "adjusted", "received")) == now.on_hand
