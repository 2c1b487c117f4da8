"""Idempotency-Key handling shared by every POST/PUT.

Two ways, one contract (same key + same request replays the first answer; same key + another request is
refused with ``idempotency_conflict``):

- Single-script operations (SKU PUT, adjustments) pass the record's key into their script, which checks
  it and stores its result in the same atomic call as the change.
- Operations spanning several script calls (reserve, confirm, release) first *claim* the key with a
  reference (the reservation id to use). A retry after a crash gets the same reference back and re-runs
  the operation, whose scripts are idempotent by reservation id, so nothing happens twice; the answer is
  stored once the operation has one.

Keys are scoped to the method and path they were sent to (as most payment APIs do), and the fingerprint
covers method, path and the canonical (key-sorted) JSON body, so whitespace or key order do not matter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from redis.asyncio import Redis

from app.stock.errors import IdempotencyConflict, ScriptCode
from app.stock.keys import KeySpace
from app.store.scripts import Scripts

MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class IdempotencyRequest:
    key: str
    scope: str  # "POST /v1/reservations"
    fingerprint: str


def fingerprint(scope: str, body: Any) -> str:
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS) if body is not None else b""
    return hashlib.sha256(scope.encode() + b"\n" + canonical).hexdigest()


class ClaimState(StrEnum):
    NEW = "new"
    RETRY = "retry"
    ANSWERED = "answered"


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    ref: str
    status: int = 0
    body: bytes = b""


class IdempotencyStore:
    def __init__(self, redis: Redis, scripts: Scripts, keys: KeySpace, ttl_seconds: int) -> None:
        self._redis = redis
        self._scripts = scripts
        self._keys = keys
        self.ttl_seconds = ttl_seconds

    def record_key(self, tenant: str, req: IdempotencyRequest) -> str:
        shard = self._keys.shard_of_idempotency(tenant, req.scope, req.key)
        return self._keys.idempotency(shard, tenant, req.scope, req.key)

    async def claim(self, tenant: str, req: IdempotencyRequest, ref: str) -> Claim:
        reply = await self._scripts.call(
            "claim_idempotency", [self.record_key(tenant, req)], [req.fingerprint, ref, self.ttl_seconds]
        )
        code = int(reply[0])
        if code == ScriptCode.IDEMPOTENCY_CONFLICT:
            raise IdempotencyConflict("this Idempotency-Key was already used with a different request; use a new key")
        if code == 2:
            answer = orjson.loads(reply[2])
            return Claim(ClaimState.ANSWERED, reply[1], int(answer["status"]), answer["body"].encode())
        return Claim(ClaimState.NEW if code == 0 else ClaimState.RETRY, reply[1])

    async def store(self, tenant: str, req: IdempotencyRequest, status: int, body: bytes) -> None:
        answer = orjson.dumps({"status": status, "body": body.decode()})
        key = self.record_key(tenant, req)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "ans", answer)
            pipe.expire(key, self.ttl_seconds)  # never leave a record without its TTL
            await pipe.execute()
