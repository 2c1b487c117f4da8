"""Revocation that takes effect at once in every API process: a key epoch in Redis, acknowledged.

Each API process caches keys (authenticator.py) so that a request costs no round trip. For a revocation
to bind every process the moment `stockhold keys revoke` returns:

1. The writer commits the change to PostgreSQL, then bumps the epoch (``announce_change``: INCR).
2. Every API process reads the epoch every STOCKHOLD_AUTH_REFRESH_MS (GET and TIME in one round trip).
   When it changed, the process drops its key cache, then records ``<epoch>:<Redis time ms>`` under its
   id in the acks hash at once; otherwise it records it every ``HEARTBEAT_MS``.
3. A process trusts its cache only while the last refresh that recorded its ack started less than
   ``TRUST_MS`` ago; past that (Redis unreachable, event loop stalled) it looks every key up in
   PostgreSQL.
4. ``await_acknowledgements`` (the barrier `keys revoke` runs) polls the acks hash until every process
   has either applied the new epoch or been silent for over ``TRUST_MS``. A silent process cannot be
   trusting its cache: the refresh its trust rests on started before its last ack, so over ``TRUST_MS``
   ago; and its next refresh reads the new epoch first. Both times are Redis's clock, so clock skew
   between machines does not matter.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.cluster import with_server_time

# How long a process trusts its key cache after its last successful refresh. Short enough that a revoke
# never waits long for a process that cannot hear it; long enough that one slow Redis reply (a few
# hundred ms under a flash sale's load) does not send every request to PostgreSQL.
TRUST_MS = 1000
# A live process records its ack at least this often, so it never looks silent (TRUST_MS) to a barrier.
# Not on every read: 20 writes a second per process would go to Redis's AOF and replicas for nothing.
HEARTBEAT_MS = 250
# Acks of processes silent for this long are deleted by the next barrier: they stopped long ago.
FORGET_AFTER_MS = 10 * 60_000
# How long `keys revoke` waits for every process by default: a live process answers within its refresh
# period (50 ms by default); a dead one is proven harmless after TRUST_MS.
BARRIER_TIMEOUT_S = 5.0
_POLL_S = 0.01


@dataclass(frozen=True, slots=True)
class Ack:
    process: str
    epoch: int
    at_ms: int  # Redis time of the refresh that applied it


@dataclass(frozen=True, slots=True)
class Announcement:
    epoch: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class BarrierResult:
    epoch: int
    elapsed_s: float
    acknowledged: list[str]  # live processes that dropped their caches
    silent: list[str]  # processes whose refresh has not succeeded for over TRUST_MS: not trusting caches
    laggards: list[str]  # neither, when the wait timed out: they may still accept the old keys

    @property
    def complete(self) -> bool:
        return not self.laggards


def ack_value(epoch: int, at_ms: int) -> str:
    return f"{epoch}:{at_ms}"


def parse_acks(raw: dict[str, str]) -> list[Ack]:
    acks = []
    for process, value in raw.items():
        epoch, _, at_ms = value.partition(":")
        if epoch.isdigit() and at_ms.isdigit():
            acks.append(Ack(process, int(epoch), int(at_ms)))
    return acks


def redis_ms(reply: tuple[int, int]) -> int:
    seconds, microseconds = reply
    return int(seconds) * 1000 + int(microseconds) // 1000


async def announce_change(redis: Redis, keys: KeySpace) -> Announcement:
    """Bumps the key epoch: call after committing a key change to PostgreSQL."""
    epoch, now = await with_server_time(redis, keys.auth_epoch(), ["INCR", keys.auth_epoch()])
    return Announcement(int(epoch), redis_ms(now))


async def await_acknowledgements(
    redis: Redis, keys: KeySpace, epoch: int, timeout_s: float = BARRIER_TIMEOUT_S
) -> BarrierResult:
    """Waits until every API process has applied ``epoch`` or been silent for over TRUST_MS."""
    started = time.monotonic()
    while True:
        raw, now = await with_server_time(redis, keys.auth_acks(), ["HGETALL", keys.auth_acks()])
        if isinstance(raw, list):  # RESP2's flat list of field, value
            raw = dict(zip(raw[::2], raw[1::2], strict=True))
        now_ms = redis_ms(now)
        acks = parse_acks(raw)
        done = sorted(a.process for a in acks if a.epoch >= epoch)
        behind = [a for a in acks if a.epoch < epoch]
        silent = sorted(a.process for a in behind if a.at_ms < now_ms - TRUST_MS)
        waiting = sorted(a.process for a in behind if a.at_ms >= now_ms - TRUST_MS)
        elapsed = time.monotonic() - started
        if not waiting or elapsed >= timeout_s:
            forgotten = [a.process for a in behind if a.at_ms < now_ms - FORGET_AFTER_MS]
            if forgotten:
                await redis.hdel(keys.auth_acks(), *forgotten)
            return BarrierResult(epoch, elapsed, done, silent, waiting)
        await asyncio.sleep(_POLL_S)
