"""Open mode (issue 5, item 8): the embedded `make run` answers requests without a key, as the default
tenant with every scope, and says so at start, in the logs and on /readyz; a request that does present a
key is still checked. Everywhere else keys are required unless STOCKHOLD_REQUIRE_AUTH=false."""

from __future__ import annotations

import logging

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from app.auth.scopes import Scope
from app.auth.store import KeyStore
from app.config import Settings
from app.main import create_app
from app.stock.keys import KeySpace
from tests.conftest import SHARDS, TENANT

KEYS = KeySpace(SHARDS)
OPEN_NOTICE = "open: unauthenticated requests act as tenant 'default' with every scope; set STOCKHOLD_REQUIRE_AUTH=true"


@pytest.mark.parametrize(
    ("require_auth", "embedded", "required"),
    [(None, False, True), (None, True, False), (True, True, True), (False, False, False)],
)
def test_keys_are_required_unless_embedded_or_said_otherwise(
    require_auth: bool | None, embedded: bool, required: bool
) -> None:
    settings = Settings(STOCKHOLD_REQUIRE_AUTH=require_auth, STOCKHOLD_EMBEDDED=embedded)

    assert settings.auth_required is required


def test_the_variables_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STOCKHOLD_REQUIRE_AUTH", raising=False)
    monkeypatch.setenv("STOCKHOLD_EMBEDDED", "true")
    assert Settings().auth_required is False
    monkeypatch.setenv("STOCKHOLD_REQUIRE_AUTH", "true")
    assert Settings().auth_required is True


async def test_without_a_key_a_request_acts_as_the_default_tenant_with_every_scope(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    assert (await client.put("/v1/skus/tea", json={"on_hand": 3})).status_code == 201
    assert (await client.post("/v1/skus/tea/adjustments", json={"delta": 1, "reason": "r"})).status_code == 200
    held = await client.post("/v1/reservations", json={"user_id": "u", "items": [{"sku": "tea", "quantity": 1}]})
    assert held.status_code == 201
    assert (await client.post(f"/v1/reservations/{held.json()['id']}/confirm")).status_code == 200

    assert await redis.exists(KEYS.sku(KEYS.shard_of(TENANT, "tea"), TENANT, "tea"))


async def test_a_key_that_is_sent_is_still_checked(
    client: httpx.AsyncClient, redis: Redis, pg_pool: asyncpg.Pool
) -> None:
    await pg_pool.execute("TRUNCATE api_key, tenant")
    _, key = await KeyStore(pg_pool).create("acme", Scope.ADMIN)
    assert (await client.put("/v1/skus/tea", json={"on_hand": 3})).status_code == 201  # the default tenant's
    body = {"user_id": "u", "items": [{"sku": "tea", "quantity": 1}]}

    # a bad key is 401, on the hot path and through FastAPI alike
    for bad in ("Bearer shk_nope", f"Bearer {key.token[:-1]}x", "Basic Zm9vOmJhcg=="):
        for response in (
            await client.get("/v1/skus/tea", headers={"authorization": bad}),
            await client.post("/v1/reservations", json=body, headers={"authorization": bad}),
        ):
            assert response.status_code == 401, (bad, response.text)
            assert response.json()["code"] == "unauthenticated"
    # a valid key acts for its own tenant, with its own scope only
    acme = {"authorization": f"Bearer {key.token}"}
    assert (await client.get("/v1/skus/tea", headers=acme)).json()["code"] == "sku_not_found"
    assert (await client.post("/v1/reservations", json=body, headers=acme)).json()["code"] == "forbidden"
    assert (await client.put("/v1/skus/tea", json={"on_hand": 9}, headers=acme)).status_code == 201
    assert await redis.exists(KEYS.sku(KEYS.shard_of("acme", "tea"), "acme", "tea"))
    assert (await client.get("/v1/skus/tea")).json()["on_hand"] == 3  # the default tenant's, untouched


async def test_readyz_says_the_service_is_open_and_stays_ready(client: httpx.AsyncClient) -> None:
    ready = await client.get("/readyz")

    assert ready.status_code == 200
    assert ready.json()["auth"] == OPEN_NOTICE


async def test_open_mode_is_a_warning_at_start_and_required_mode_is_not(
    settings: Settings, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    for require_auth in (False, True):
        caplog.clear()
        application = create_app(settings.model_copy(update={"require_auth": require_auth}))
        with caplog.at_level(logging.WARNING, logger="stockhold"):
            async with application.router.lifespan_context(application):
                transport = httpx.ASGITransport(app=application)
                async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as http:
                    readyz = (await http.get("/readyz")).json()
                    no_key = await http.get("/v1/skus/tea")
        warned = [r.getMessage() for r in caplog.records if "NOT required" in r.getMessage()]
        if require_auth:
            assert (readyz["auth"], no_key.status_code, warned) == ("required", 401, [])
            assert no_key.headers["www-authenticate"] == 'Bearer realm="stockhold"'
        else:
            assert (readyz["auth"], no_key.status_code) == (OPEN_NOTICE, 404)
            assert warned == [f"API keys NOT required: {OPEN_NOTICE}"]
