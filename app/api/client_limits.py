"""The per-client-IP rate limit, checked in front of everything under /v1 (the hot path included).

The address is the TCP peer's, or, behind a proxy, the last address of the one header configured as
trusted (STOCKHOLD_CLIENT_IP_HEADER): the proxy appends the address it saw, while anything before it
came from the client and may be forged.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import Receive, Scope, Send

from app.api.problems import from_stock_error, store_unavailable
from app.stock.errors import RateLimited

LIMITED_PREFIX = "/v1/"


def client_address(scope: Scope, header: bytes | None) -> str:
    """The client's address: the trusted header's last entry when configured and present, else the peer."""
    if header is not None:
        # the last line of the header, then its last address: a proxy that adds a line of its own (rather
        # than appending to the client's) puts it after any the client sent
        values = [value for name, value in scope["headers"] if name == header]
        if values:
            last: str = values[-1].decode("latin-1").rsplit(",", 1)[-1].strip()
            if last:
                return last
    client: tuple[str, int] | None = scope.get("client")
    return client[0] if client else "unknown"


async def admit_client(state: Any, scope: Scope, receive: Receive, send: Send) -> bool:
    """False when the call was answered here (429 rate_limited, or 503 when Redis cannot tell)."""
    limiter = getattr(state, "rate_limiter", None)  # absent before the lifespan has run
    if limiter is None or limiter.per_ip is None or scope["type"] != "http":
        return True
    path: str = scope["path"]
    if not path.startswith(LIMITED_PREFIX):
        return True  # operations (/healthz, /readyz, /metrics, /docs) stay reachable
    header = state.settings.client_ip_header
    try:
        await limiter.check_ip(client_address(scope, header.lower().encode("latin-1") if header else None))
    except RateLimited as exc:
        await from_stock_error(exc, path)(scope, receive, send)
        return False
    except (RedisConnectionError, RedisTimeoutError) as exc:
        await store_unavailable(exc, path)(scope, receive, send)
        return False
    return True
