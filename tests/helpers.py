"""Helpers shared by tests: keyspace snapshots and small request builders."""

from __future__ import annotations

from typing import Any

import httpx
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.stock.schemas import ReservationItem, ReservationRequest


async def mark_ready(redis: Redis, keys: KeySpace) -> None:
    """Marks every shard rebuilt, as a rebuild from an empty PostgreSQL would: the state of a fresh
    install. (Only app/recovery/rebuild.py writes markers in the service.)"""
    async with redis.pipeline(transaction=False) as pipe:
        for shard in keys.all_shards():
            pipe.set(keys.ready(shard), '{"source": "tests"}')
        await pipe.execute()


async def snapshot(redis: Redis) -> dict[str, Any]:
    """Everything in the test database, by key: a request that must change nothing leaves this equal.
    Except the API processes' key-epoch acknowledgements, which every process rewrites every 50 ms."""
    state: dict[str, Any] = {}
    async for key in redis.scan_iter(count=1000):
        if key == KeySpace.auth_acks():
            continue
        kind = await redis.type(key)
        if kind == "hash":
            state[key] = await redis.hgetall(key)  # type: ignore[misc]
        elif kind == "zset":
            state[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            # what was ever added, not the length: the worker trims persisted entries at any moment
            info = await redis.xinfo_stream(key)
            state[key] = (info["entries-added"], info["last-generated-id"])
        elif kind == "string":
            state[key] = await redis.get(key)
        else:
            state[key] = kind
    return state


async def put_sku(client: httpx.AsyncClient, sku: str, **settings: Any) -> dict[str, Any]:
    response = await client.put(f"/v1/skus/{sku}", json=settings)
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


async def reserve(client: httpx.AsyncClient, user: str, *items: tuple[str, int], **extra: Any) -> httpx.Response:
    body = {"user_id": user, "items": [{"sku": s, "quantity": q} for s, q in items], **extra}
    return await client.post("/v1/reservations", json=body)


async def sku_state(client: httpx.AsyncClient, sku: str) -> dict[str, Any]:
    response = await client.get(f"/v1/skus/{sku}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def req(user: str, *items: tuple[str, int], channel: str | None = None) -> ReservationRequest:
    """A reservation request for StockService calls: `items` as (sku, quantity) pairs."""
    return ReservationRequest(
        user_id=user, items=[ReservationItem(sku=s, quantity=q) for s, q in items], channel=channel
    )
