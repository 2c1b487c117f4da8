"""Checks API keys with no round trip per request: a per-process cache of key id -> credential, loaded
from PostgreSQL on a miss, dropped whenever the key epoch changes (epoch.py has the protocol).

A cache hit costs a dict lookup, one SHA-256 and a constant-time compare. Unknown ids are cached too
(bounded), so a client retrying with a bad key does not cost a query per request. While the epoch
refresh is failing (Redis unreachable) for over ``TRUST_MS``, the cache is not trusted: every key is
looked up in PostgreSQL, so a revocation made meanwhile still binds at once (fail safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from app.auth.epoch import HEARTBEAT_MS, TRUST_MS, ack_value, redis_ms
from app.auth.errors import Unauthenticated
from app.auth.scopes import Principal
from app.auth.store import KeyStore
from app.auth.tokens import secret_matches, split_key
from app.stock.errors import NotReady
from app.stock.keys import KeySpace
from app.store.cluster import with_server_time

log = logging.getLogger(__name__)

MALFORMED = "send the API key as `Authorization: Bearer shk_<id>_<secret>`"
INVALID = "the API key is not valid: unknown, revoked, or not the secret it was issued with"
# A process keeps at most this many unknown key ids (then forgets them all): bounds the memory a client
# sending random ids can take, while a client retrying one bad key still costs one query.
NEGATIVE_CACHE_SIZE = 10_000
# A key lookup that PostgreSQL has not answered in this time answers 503 not_ready (retry).
LOOKUP_TIMEOUT_S = 2.0
_TRUST_S = TRUST_MS / 1000
_HEARTBEAT_S = HEARTBEAT_MS / 1000


@dataclass(frozen=True, slots=True)
class _Known:
    principal: Principal
    secret_sha256: bytes


def process_id() -> str:
    """Unique per process and start: host, pid and a random suffix (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Authenticator:
    def __init__(
        self,
        store: KeyStore,
        redis: Redis,
        keys: KeySpace,
        refresh_ms: int,
        process: str | None = None,
    ) -> None:
        self.store = store
        self.redis = redis
        self.keys = keys
        self.refresh_s = refresh_ms / 1000
        self.process = process or process_id()
        self._known: dict[str, _Known] = {}
        self._unknown: set[str] = set()
        self._generation = 0  # bumped whenever the cache is dropped
        self._epoch: str | None = None  # the epoch the cache reflects
        self._acked_epoch: str | None = None
        self._acked_since = -math.inf  # monotonic start of the last refresh that recorded its ack
        self._failing = False

    # -- requests -------------------------------------------------------------------------------------

    async def authenticate(self, token: str) -> Principal:
        """The principal of ``token`` (``shk_<id>_<secret>``); Unauthenticated when it is malformed,
        unknown, revoked or has the wrong secret; NotReady when PostgreSQL must be asked and cannot be."""
        parts = split_key(token)
        if parts is None:
            raise Unauthenticated(MALFORMED, error="invalid_token")
        key_id, secret = parts
        known = self._known.get(key_id) if time.monotonic() - self._acked_since <= _TRUST_S else None
        if known is None:
            known = await self._lookup(key_id)
        if known is None or not secret_matches(secret, known.secret_sha256):
            raise Unauthenticated(INVALID, error="invalid_token")
        return known.principal

    def trusts_cache(self) -> bool:
        return time.monotonic() - self._acked_since <= _TRUST_S

    async def _lookup(self, key_id: str) -> _Known | None:
        trusted = self.trusts_cache()
        if trusted and key_id in self._unknown:
            return None
        generation = self._generation
        try:
            credential = await asyncio.wait_for(self.store.credential(key_id), LOOKUP_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("API key lookup failed: %r", exc)
            raise NotReady("the key store (PostgreSQL) is unavailable; retry shortly") from exc
        known = None
        if credential is not None:
            principal = Principal(credential.tenant, frozenset({credential.scope}), key_id)
            known = _Known(principal, credential.secret_sha256)
        # Remember it only if no epoch change dropped the cache meanwhile: the answer may predate a
        # revocation the barrier already counted this process as having applied.
        if trusted and generation == self._generation:
            if known is not None:
                self._known[key_id] = known
            else:
                if len(self._unknown) >= NEGATIVE_CACHE_SIZE:
                    self._unknown.clear()
                self._unknown.add(key_id)
        return known

    # -- the epoch refresh ----------------------------------------------------------------------------

    def drop_cache(self) -> None:
        self._known = {}
        self._unknown = set()
        self._generation += 1

    async def refresh(self) -> None:
        """Reads the epoch; drops the cache when it changed (or after a failing spell, whatever may have
        changed meanwhile); acknowledges at once after a change, and every HEARTBEAT_MS otherwise."""
        started = time.monotonic()
        epoch, now = await with_server_time(self.redis, self.keys.auth_epoch(), ["GET", self.keys.auth_epoch()])
        untrusted = started - self._acked_since > _TRUST_S
        if epoch != self._epoch or untrusted:
            self.drop_cache()
            self._epoch = epoch
        if epoch != self._acked_epoch or untrusted or started - self._acked_since >= _HEARTBEAT_S:
            await self.redis.hset(self.keys.auth_acks(), self.process, ack_value(int(epoch or 0), redis_ms(now)))
            self._acked_epoch = epoch
            self._acked_since = started

    async def run(self, stop: asyncio.Event) -> None:
        """Refreshes every ``refresh_ms`` until ``stop``; then withdraws this process's ack."""
        while not stop.is_set():
            try:
                await self.refresh()
                if self._failing:
                    log.info("key epoch readable again: API keys cached again")
                    self._failing = False
            except Exception as exc:  # Redis down or slow: the cache goes untrusted after TRUST_MS
                if not self._failing:
                    log.warning("cannot read the key epoch (%r): API keys are looked up in PostgreSQL", exc)
                    self._failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.refresh_s)
        try:
            await self.redis.hdel(self.keys.auth_acks(), self.process)
        except Exception as exc:
            log.info("could not withdraw the key epoch ack of %s: %r", self.process, exc)
