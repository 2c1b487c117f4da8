"""Redis connections.

A BlockingConnectionPool caps connections per process: under a flash-sale burst, requests queue for a
connection for up to POOL_TIMEOUT_SECONDS instead of opening thousands of sockets (and hitting maxclients).
Socket timeouts bound how long a stalled Redis can hold a request or the sweeper: the API answers 503
not_ready instead of hanging.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

from app.store.cluster import cluster_nodes, connect_cluster

POOL_SIZE = 128
POOL_TIMEOUT_SECONDS = 5.0
SOCKET_TIMEOUT_SECONDS = 5.0  # a script call takes microseconds; seconds mean Redis is in trouble
CONNECT_TIMEOUT_SECONDS = 2.0


def connect_redis(url: str, pool_size: int = POOL_SIZE) -> Redis:
    """A client for ``redis://`` (one server) or ``redis+cluster://host:port,...`` (a Redis Cluster)."""
    nodes = cluster_nodes(url)
    if nodes is not None:
        # per node: a cluster spreads the load, and each node's pool bounds its sockets as above
        return connect_cluster(
            nodes, pool_size=pool_size, socket_timeout=SOCKET_TIMEOUT_SECONDS, connect_timeout=CONNECT_TIMEOUT_SECONDS
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=POOL_TIMEOUT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        decode_responses=True,
    )
    return Redis(connection_pool=pool)
