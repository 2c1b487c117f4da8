"""Redis connections.

A BlockingConnectionPool caps connections per process: under a flash-sale burst, requests queue for a
connection for up to REDIS_POOL_TIMEOUT instead of opening thousands of sockets (and hitting maxclients).
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

POOL_SIZE = 128
POOL_TIMEOUT_SECONDS = 5.0


def connect_redis(url: str, pool_size: int = POOL_SIZE) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=POOL_TIMEOUT_SECONDS, decode_responses=True
    )
    return Redis(connection_pool=pool)
