"""The only place Redis key names are built.

Every SKU maps to one of `shard_count` shards by ``crc32(tenant:sku) % shard_count``; every key of a shard
carries the hash tag ``{<shard>}``, so all keys one script call touches live in one cluster hash slot (on a
single Redis and on Redis Cluster alike). Lua scripts never build key names: they receive these as KEYS.

Layout (``s`` = shard number)::

    sh:{s}:sku:<tenant>:<sku>     HASH  counters and settings of one SKU
    sh:{s}:usr:<tenant>:<sku>     HASH  user_id -> units held + bought (per-user limit)
    sh:{s}:lapses:<tenant>:<sku>  HASH  user_id -> hoarding record: recent lapsed holds, cooldown end
                                        (lua/includes/policy.lua; expires when the rule no longer needs it)
    sh:{s}:boq:<tenant>:<sku>     ZSET  reservation_id -> when its line took units on backorder (ms): the
                                        presale's queue that receipts fill, oldest first (the line's units
                                        are the part's `b:<sku>` field)
    sh:{s}:chan:<tenant>:<sku>    HASH  the SKU's sales channels: q:/u:/p:/b:<channel> = quota, used, priority,
                                        borrow (lua/includes/channels.lua)
    sh:{s}:listing:<tenant>:<id>  STRING a listing's components (JSON), on the shard of (tenant, listing id)
    sh:{s}:res:<reservation_id>   HASH  one reservation's part on this shard (+ the document on its home shard)
    sh:{s}:expiry                 ZSET  reservation_id -> deadline (ms) of live pre_reserve holds
    sh:{s}:events                 STREAM every stock change, XADDed by the script that made it
    sh:{s}:idem:<tenant>:<digest> HASH  an Idempotency-Key's fingerprint and first answer
    sh:{s}:lease:<reservation_id> STRING who is operating on a reservation spanning shards (on its home shard)
    sh:{s}:splitlock:<tenant>:<sku> STRING who is changing a split SKU's buckets (app/stock/splitting.py)
    rl:{<kind>:<subject>}         HASH  a rate limit's token bucket (kind user or ip): not a shard's key, each
                                        bucket is its own hash slot (app/stock/rate_limits.py)
    sh:{s}:ready                  STRING the shard was rebuilt from PostgreSQL (when, JSON); stock scripts refuse
                                         to run without it, so an emptied Redis never sells from nothing
    sh:{s}:rebuilding             STRING lock held by the process rebuilding the shard

Not per shard (one hash tag of their own, so each is one slot on a cluster too)::

    sh:{auth}:epoch               STRING bumped (INCR) whenever an API key is created or revoked: each API
                                         process drops its key cache when it sees it change (app/auth/)
    sh:{auth}:acks                HASH   API process id -> "<epoch it has applied>:<Redis time in ms>";
                                         `keys revoke` waits on it until every live process dropped the key
    sh:{split}:version            STRING bumped (INCR) whenever a SKU is split or unsplit: each API process
                                         reloads its split map from PostgreSQL when it sees it move

A split SKU's bucket i > 0 is the SKU "<sku>~<i>" with keys of its own like any SKU's, on the shard i after
the SKU's (shard_of): K buckets on K different shards, so on a cluster on different slots (and nodes).
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

PREFIX = "sh"
AUTH_TAG = "auth"  # the hash tag of the API keys' epoch and acknowledgements: never a shard number
SPLIT_TAG = "split"  # the hash tag of the split SKUs' version (app/stock/buckets.py)
# A split SKU's bucket i > 0 is the internal SKU "<sku>~<i>" (app/stock/buckets.py); "~" is outside the
# API's SKU alphabet, so no client SKU is ever mistaken for a bucket.
BUCKET_SEPARATOR = "~"


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds key names for one deployment (its shard count is part of the layout)."""

    shard_count: int

    def shard_of(self, tenant: str, sku: str) -> int:
        base, sep, index = sku.partition(BUCKET_SEPARATOR)
        if sep:  # bucket i of a split SKU: i shards after the SKU's own, so K <= shard_count never collide
            return (zlib.crc32(f"{tenant}:{base}".encode()) + int(index)) % self.shard_count
        return zlib.crc32(f"{tenant}:{sku}".encode()) % self.shard_count

    def shard_of_idempotency(self, tenant: str, scope: str, key: str) -> int:
        return zlib.crc32(f"{tenant}:{scope}:{key}".encode()) % self.shard_count

    @staticmethod
    def _tag(shard: int) -> str:
        return f"{PREFIX}:{{{shard}}}"

    def sku(self, shard: int, tenant: str, sku: str) -> str:
        return f"{self._tag(shard)}:sku:{tenant}:{sku}"

    def user_counts(self, shard: int, tenant: str, sku: str) -> str:
        return f"{self._tag(shard)}:usr:{tenant}:{sku}"

    def lapses(self, shard: int, tenant: str, sku: str) -> str:
        return f"{self._tag(shard)}:lapses:{tenant}:{sku}"

    def backorder_queue(self, shard: int, tenant: str, sku: str) -> str:
        return f"{self._tag(shard)}:boq:{tenant}:{sku}"

    def channels(self, shard: int, tenant: str, sku: str) -> str:
        return f"{self._tag(shard)}:chan:{tenant}:{sku}"

    def listing(self, shard: int, tenant: str, listing: str) -> str:
        return f"{self._tag(shard)}:listing:{tenant}:{listing}"

    def reservation(self, shard: int, reservation_id: str) -> str:
        return f"{self._tag(shard)}:res:{reservation_id}"

    def expiry(self, shard: int) -> str:
        return f"{self._tag(shard)}:expiry"

    def events(self, shard: int) -> str:
        return f"{self._tag(shard)}:events"

    def idempotency(self, shard: int, tenant: str, scope: str, key: str) -> str:
        # Hash the client's key: it may be long or contain anything; the digest keeps key names bounded.
        digest = hashlib.sha256(f"{scope}\n{key}".encode()).hexdigest()[:32]
        return f"{self._tag(shard)}:idem:{tenant}:{digest}"

    @staticmethod
    def rate_bucket(kind: str, subject: str) -> str:
        return f"rl:{{{kind}:{subject}}}"

    def split_lock(self, shard: int, tenant: str, sku: str) -> str:
        return f"{self._tag(shard)}:splitlock:{tenant}:{sku}"

    def lease(self, shard: int, reservation_id: str) -> str:
        return f"{self._tag(shard)}:lease:{reservation_id}"

    def ready(self, shard: int) -> str:
        return f"{self._tag(shard)}:ready"

    def rebuild_lock(self, shard: int) -> str:
        return f"{self._tag(shard)}:rebuilding"

    @staticmethod
    def auth_epoch() -> str:
        return f"{PREFIX}:{{{AUTH_TAG}}}:epoch"

    @staticmethod
    def auth_acks() -> str:
        return f"{PREFIX}:{{{AUTH_TAG}}}:acks"

    @staticmethod
    def split_version() -> str:
        return f"{PREFIX}:{{{SPLIT_TAG}}}:version"

    def shard_pattern(self, shard: int) -> str:
        """A SCAN pattern for every key of one shard (braces are literal in Redis glob patterns)."""
        return f"{self._tag(shard)}:*"

    def rebuilt_from_postgres(self, shard: int, key: str) -> bool:
        """Whether a rebuild replaces this key of the shard: stock state (SKUs, per-user units,
        reservation parts, expiry index, backorder queues, channels, ready marker) and listings yes; the event stream
        (it may hold events not yet persisted), idempotency records, leases and the rebuild lock no."""
        tag = self._tag(shard)
        kinds = ("sku", "usr", "res", "boq", "chan", "listing")
        rebuilt = key.startswith(tuple(f"{tag}:{k}:" for k in kinds))
        return rebuilt or key == self.expiry(shard) or key == self.ready(shard)

    def all_shards(self) -> range:
        return range(self.shard_count)
