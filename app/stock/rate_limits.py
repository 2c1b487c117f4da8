"""Rate limits per user and per client IP: token buckets in Redis, one take_token-1.lua call each.

A bucket per subject holds ``burst`` tokens and refills at ``rate`` per second; each request takes one.
Buckets live in Redis so every API process and replica shares them; each is its own key in its own hash
slot (the whole identity is the hash tag), so they spread over a cluster and a call touches one slot.
Both limits are off unless configured (app/config.py): stockhold is usually called by checkout servers,
so a per-IP limit only makes sense behind a proxy that passes the shopper's address in a trusted header.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.stock.clock import now_ms
from app.stock.errors import RateLimited
from app.stock.keys import KeySpace
from app.store.scripts import Scripts


@dataclass(frozen=True, slots=True)
class Bucket:
    rate: float  # tokens per second
    burst: int  # the most requests at once after a quiet spell


def bucket(rate: float, burst: int) -> Bucket | None:
    """The bucket a rate and burst setting describe; None (no limit) for a rate of 0."""
    return Bucket(rate, burst) if rate > 0 else None


class RateLimiter:
    def __init__(self, scripts: Scripts, keys: KeySpace, per_user: Bucket | None, per_ip: Bucket | None) -> None:
        self.scripts = scripts
        self.keys = keys
        self.per_user = per_user
        self.per_ip = per_ip

    async def check_user(self, tenant: str, user_id: str) -> None:
        """Raises RateLimited when the user has no token left (a no-op with the limit off)."""
        if self.per_user is not None:
            await self._take("user", f"{tenant}:{user_id}", self.per_user, f"user {user_id!r}")

    async def check_ip(self, address: str) -> None:
        """Raises RateLimited when the client address has no token left (a no-op with the limit off)."""
        if self.per_ip is not None:
            await self._take("ip", address, self.per_ip, f"client address {address}")

    async def _take(self, kind: str, subject: str, bucket: Bucket, who: str) -> None:
        allowed, value = await self.scripts.call(
            "take_token", [self.keys.rate_bucket(kind, subject)], [now_ms(), bucket.rate, bucket.burst]
        )
        if not int(allowed):
            seconds = max(1, -(-int(value) // 1000))  # rounded up: retrying earlier is refused again
            raise RateLimited(
                f"too many requests for {who}: at most {bucket.rate:g}/s (bursts of {bucket.burst}); "
                f"retry in {seconds} s",
                retry_after=seconds,
                limit=kind,
            )
