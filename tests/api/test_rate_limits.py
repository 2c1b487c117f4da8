"""Rate limits through the API: per user on reservations, per client IP on every /v1 call (from a trusted
proxy header only when one is configured); 429 rate_limited with Retry-After, and a refusal changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from redis.asyncio import Redis

from app.config import Settings
from app.main import create_app
from app.stock.keys import KeySpace
from tests.helpers import put_sku, reserve, snapshot


@asynccontextmanager
async def client_with(settings: Settings, **changes: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the real app (lifespan and all) with some settings changed."""
    app = create_app(settings.model_copy(update=changes))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as client:
            yield client


async def test_a_user_past_the_rate_gets_429_and_nothing_changes(settings: Settings, redis: Redis) -> None:
    async with client_with(settings, user_rate_per_second=0.5, user_burst=2) as client:
        await put_sku(client, "gpu", on_hand=100)
        assert (await reserve(client, "bot", ("gpu", 1))).status_code == 201
        assert (await reserve(client, "bot", ("gpu", 1))).status_code == 201
        before = await snapshot(redis)

        refused = await reserve(client, "bot", ("gpu", 1), buyer={"orders_count": 3})

        assert refused.status_code == 429
        body = refused.json()
        assert (body["code"], body["limit"]) == ("rate_limited", "user")
        assert refused.headers["Retry-After"] == "2"  # 0.5/s: the next token in 2 s
        assert body["retry_after"] == 2
        assert await snapshot(redis) == before
        # another user has a bucket of their own, and reads are not counted against anyone
        assert (await reserve(client, "person", ("gpu", 1))).status_code == 201
        assert (await client.get("/v1/skus/gpu")).status_code == 200


async def test_a_rate_limited_reservation_claims_no_idempotency_key(settings: Settings, redis: Redis) -> None:
    async with client_with(settings, user_rate_per_second=0.001, user_burst=1) as client:
        await put_sku(client, "gpu", on_hand=100)
        body = {"user_id": "bot", "items": [{"sku": "gpu", "quantity": 1}]}
        assert (await client.post("/v1/reservations", json=body)).status_code == 201
        first = await client.post("/v1/reservations", json=body, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 429

        # when the bucket has refilled (its key gone, as after an idle spell), the same key is retried
        await redis.delete(KeySpace.rate_bucket("user", "default:bot"))
        retry = await client.post("/v1/reservations", json=body, headers={"Idempotency-Key": "k1"})

        # then it runs afresh rather than replaying the 429
        assert retry.status_code == 201, retry.text


async def test_the_ip_limit_covers_every_v1_call_but_not_operations(settings: Settings, redis: Redis) -> None:
    async with client_with(settings, ip_rate_per_second=0.5, ip_burst=3) as client:
        await put_sku(client, "gpu", on_hand=100)  # 1
        assert (await client.get("/v1/skus/gpu")).status_code == 200  # 2
        assert (await reserve(client, "a", ("gpu", 1))).status_code == 201  # 3, through the hot path

        for call in (client.get("/v1/skus/gpu"), reserve(client, "b", ("gpu", 1))):
            refused = await call
            assert refused.status_code == 429
            assert (refused.json()["code"], refused.json()["limit"]) == ("rate_limited", "ip")
            assert refused.headers["Retry-After"] == "2"
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200

        # a forwarded-for header is not believed when no header is configured as trusted
        forged = await client.get("/v1/skus/gpu", headers={"X-Forwarded-For": "203.0.113.1"})
        assert forged.status_code == 429


async def test_behind_a_proxy_the_trusted_headers_last_address_is_the_client(
    settings: Settings,
    redis: Redis,  # `redis`: a flushed database, so every bucket starts full
) -> None:
    async with client_with(settings, ip_rate_per_second=0.5, ip_burst=1, client_ip_header="X-Forwarded-For") as client:
        await put_sku(client, "gpu", on_hand=100)  # the proxy's own address (no header): its bucket

        def via_proxy(chain: str) -> dict[str, str]:
            return {"X-Forwarded-For": chain}

        # two shoppers behind the proxy: separate buckets
        assert (await client.get("/v1/skus/gpu", headers=via_proxy("203.0.113.1"))).status_code == 200
        assert (await client.get("/v1/skus/gpu", headers=via_proxy("203.0.113.2"))).status_code == 200
        # the first shopper again, forging an earlier hop: only the last address counts, still refused
        again = await client.get("/v1/skus/gpu", headers=via_proxy("10.9.9.9, 203.0.113.1"))
        assert again.status_code == 429


async def test_a_client_line_of_the_trusted_header_before_the_proxys_is_not_believed(
    settings: Settings, redis: Redis
) -> None:
    async with client_with(settings, ip_rate_per_second=0.5, ip_burst=1, client_ip_header="X-Forwarded-For") as client:
        await put_sku(client, "gpu", on_hand=100)

        def lines(*values: str) -> list[tuple[str, str]]:  # separate header lines, in order
            return [("X-Forwarded-For", value) for value in values]

        # the proxy adds its own line after the client's forged one: the proxy's line is the client
        assert (await client.get("/v1/skus/gpu", headers=lines("6.6.6.6", "203.0.113.9"))).status_code == 200
        again = await client.get("/v1/skus/gpu", headers=lines("7.7.7.7", "203.0.113.9"))
        assert again.status_code == 429  # same shopper, another forged line: the same bucket
