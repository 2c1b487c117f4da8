"""The webhook and alert endpoints: create (secret shown once), read, change, delete; bad input is 422
and changes nothing; keys, scopes and tenants as everywhere else under /v1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from app.auth.scopes import Scope
from app.auth.store import KeyStore
from app.config import Settings
from app.main import create_app
from tests.helpers import put_sku

HOOK = {"url": "https://example.test/hooks/stock", "events": ["sold_out", "low_stock"], "description": "shop"}


async def table(pg: asyncpg.Pool) -> list[dict[str, Any]]:
    return [dict(r) for r in await pg.fetch("SELECT * FROM webhook_endpoint ORDER BY id")]


async def test_create_read_change_delete(wh_client: httpx.AsyncClient, wh_pg: asyncpg.Pool) -> None:
    created = await wh_client.post("/v1/webhooks", json=HOOK)
    assert created.status_code == 201, created.text
    hook = created.json()
    assert hook["id"].startswith("wh_") and hook["secret"].startswith("whsec_")
    assert hook["url"] == HOOK["url"] and hook["events"] == ["sold_out", "low_stock"] and hook["active"] is True
    assert await wh_pg.fetchval("SELECT secret FROM webhook_endpoint") == hook["secret"]  # kept to sign

    one = (await wh_client.get(f"/v1/webhooks/{hook['id']}")).json()
    listed = (await wh_client.get("/v1/webhooks")).json()["webhooks"]
    assert "secret" not in one and listed == [one]
    assert {k: v for k, v in hook.items() if k != "secret"} == one

    patched = await wh_client.patch(f"/v1/webhooks/{hook['id']}", json={"active": False, "events": ["back_in_stock"]})
    assert patched.status_code == 200, patched.text
    assert patched.json()["active"] is False and patched.json()["events"] == ["back_in_stock"]
    assert patched.json()["url"] == HOOK["url"] and patched.json()["description"] == "shop"  # left out: kept

    assert (await wh_client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204
    gone = await wh_client.get(f"/v1/webhooks/{hook['id']}")
    assert gone.status_code == 404 and gone.json()["code"] == "webhook_not_found"
    assert (await wh_client.delete(f"/v1/webhooks/{hook['id']}")).json()["code"] == "webhook_not_found"
    assert (await wh_client.get(f"/v1/webhooks/{hook['id']}/deliveries")).status_code == 404


BAD_CREATES = {
    "ftp url": {**HOOK, "url": "ftp://example.test/x"},
    "javascript url": {**HOOK, "url": "javascript:alert(1)"},
    "no host": {**HOOK, "url": "http:///path"},
    "not a url": {**HOOK, "url": "example.test/hook"},
    "space in url": {**HOOK, "url": "http://example.test/a b"},
    "bad port": {**HOOK, "url": "http://example.test:99999/"},
    "empty url": {**HOOK, "url": ""},
    "url too long": {**HOOK, "url": "https://example.test/" + "a" * 2100},
    "url not a string": {**HOOK, "url": 5},
    "no events": {**HOOK, "events": []},
    "unknown event": {**HOOK, "events": ["sold_out", "price_changed"]},
    "event twice": {**HOOK, "events": ["sold_out", "sold_out"]},
    "events not a list": {**HOOK, "events": "sold_out"},
    "missing url": {"events": ["sold_out"]},
    "extra field": {**HOOK, "secret": "mine"},
    "description too long": {**HOOK, "description": "x" * 501},
}


@pytest.mark.parametrize("case", BAD_CREATES)
async def test_bad_creates_are_422_and_change_nothing(
    wh_client: httpx.AsyncClient, wh_pg: asyncpg.Pool, case: str
) -> None:
    assert (await wh_client.post("/v1/webhooks", json=HOOK)).status_code == 201
    before = await table(wh_pg)

    response = await wh_client.post("/v1/webhooks", json=BAD_CREATES[case])

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "validation_error" and problem["errors"]
    assert await table(wh_pg) == before


BAD_PATCHES = {
    "nothing": {},
    "null url": {"url": None},
    "null events": {"events": None},
    "null active": {"active": None},
    "ftp url": {"url": "ftp://example.test/"},
    "active as a string": {"active": "false"},
    "unknown event": {"events": ["restocked"]},
    "extra field": {"tenant": "other"},
}


@pytest.mark.parametrize("case", BAD_PATCHES)
async def test_bad_patches_are_422_and_change_nothing(
    wh_client: httpx.AsyncClient, wh_pg: asyncpg.Pool, case: str
) -> None:
    hook = (await wh_client.post("/v1/webhooks", json=HOOK)).json()
    before = await table(wh_pg)

    response = await wh_client.patch(f"/v1/webhooks/{hook['id']}", json=BAD_PATCHES[case])

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    assert await table(wh_pg) == before


async def test_the_message_says_what_is_wrong_with_the_url(wh_client: httpx.AsyncClient) -> None:
    response = await wh_client.post("/v1/webhooks", json={**HOOK, "url": "ftp://example.test/"})
    assert "http or https" in response.json()["detail"]


async def test_alerts_set_read_and_clear_a_threshold(wh_client: httpx.AsyncClient, wh_pg: asyncpg.Pool) -> None:
    await put_sku(wh_client, "tea", on_hand=10)
    assert (await wh_client.get("/v1/skus/tea/alerts")).json() == {"sku": "tea", "low_stock_threshold": None}

    put = await wh_client.put("/v1/skus/tea/alerts", json={"low_stock_threshold": 3})
    assert put.status_code == 200, put.text
    assert (await wh_client.get("/v1/skus/tea/alerts")).json() == {"sku": "tea", "low_stock_threshold": 3}

    for bad in ({"low_stock_threshold": 0}, {"low_stock_threshold": "3"}, {"low_stock_threshold": 1.5}, {}, {"x": 1}):
        response = await wh_client.put("/v1/skus/tea/alerts", json=bad)
        assert response.status_code == 422 and response.json()["code"] == "validation_error", bad
    assert await wh_pg.fetchval("SELECT low_stock_threshold FROM sku_alert") == 3

    cleared = await wh_client.put("/v1/skus/tea/alerts", json={"low_stock_threshold": None})
    assert cleared.json() == {"sku": "tea", "low_stock_threshold": None}
    assert await wh_pg.fetchval("SELECT count(*) FROM sku_alert") == 0


async def test_alerts_of_an_unknown_sku_are_404(wh_client: httpx.AsyncClient, wh_pg: asyncpg.Pool) -> None:
    for response in (
        await wh_client.put("/v1/skus/nope/alerts", json={"low_stock_threshold": 3}),
        await wh_client.get("/v1/skus/nope/alerts"),
    ):
        assert response.status_code == 404 and response.json()["code"] == "sku_not_found"
    assert await wh_pg.fetchval("SELECT count(*) FROM sku_alert") == 0


async def test_deliveries_limit_is_checked(wh_client: httpx.AsyncClient) -> None:
    hook = (await wh_client.post("/v1/webhooks", json=HOOK)).json()
    ok = await wh_client.get(f"/v1/webhooks/{hook['id']}/deliveries", params={"limit": 5})
    assert ok.status_code == 200 and ok.json() == {"deliveries": []}
    for limit in (0, 501, "x"):
        bad = await wh_client.get(f"/v1/webhooks/{hook['id']}/deliveries", params={"limit": limit})
        assert bad.status_code == 422 and bad.json()["code"] == "validation_error"


# -- keys, scopes and tenants ---------------------------------------------------------------------------

A, B = "tenant-a", "tenant-b"


@pytest_asyncio.fixture
async def secured(
    settings: Settings, redis: Redis, wh_pg: asyncpg.Pool
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[tuple[str, Scope], dict[str, str]]]]:
    await wh_pg.execute("TRUNCATE api_key, tenant")
    store = KeyStore(wh_pg)
    auth = {(t, s): {"authorization": f"Bearer {(await store.create(t, s))[1].token}"} for t in (A, B) for s in Scope}
    application = create_app(settings.model_copy(update={"require_auth": True, "webhooks": False}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as client:
            yield client, auth


async def test_admin_changes_every_scope_reads_and_no_key_is_401(
    secured: tuple[httpx.AsyncClient, dict[tuple[str, Scope], dict[str, str]]], wh_pg: asyncpg.Pool
) -> None:
    client, auth = secured
    assert (await client.post("/v1/webhooks", json=HOOK)).status_code == 401
    for scope in (Scope.READ, Scope.CHECKOUT):
        refused = await client.post("/v1/webhooks", json=HOOK, headers=auth[A, scope])
        assert refused.status_code == 403 and refused.json()["needed_scopes"] == ["admin"]
    hook = (await client.post("/v1/webhooks", json=HOOK, headers=auth[A, Scope.ADMIN])).json()
    path = f"/v1/webhooks/{hook['id']}"
    await client.put("/v1/skus/tea", json={"on_hand": 5}, headers=auth[A, Scope.ADMIN])
    before = await table(wh_pg)

    for scope in (Scope.READ, Scope.CHECKOUT):
        assert (await client.patch(path, json={"active": False}, headers=auth[A, scope])).status_code == 403
        assert (await client.delete(path, headers=auth[A, scope])).status_code == 403
        alerts = await client.put("/v1/skus/tea/alerts", json={"low_stock_threshold": 1}, headers=auth[A, scope])
        assert alerts.status_code == 403
    for scope in Scope:  # every scope reads
        assert (await client.get(path, headers=auth[A, scope])).status_code == 200
        assert (await client.get("/v1/webhooks", headers=auth[A, scope])).json()["webhooks"][0]["id"] == hook["id"]
        assert (await client.get(f"{path}/deliveries", headers=auth[A, scope])).status_code == 200
        assert (await client.get("/v1/skus/tea/alerts", headers=auth[A, scope])).status_code == 200
    for call in (client.get(path), client.get("/v1/webhooks"), client.delete(path), client.get("/v1/skus/tea/alerts")):
        assert (await call).status_code == 401
    assert await table(wh_pg) == before
    assert await wh_pg.fetchval("SELECT count(*) FROM sku_alert") == 0


async def test_another_tenants_webhook_is_not_found_and_untouched(
    secured: tuple[httpx.AsyncClient, dict[tuple[str, Scope], dict[str, str]]], wh_pg: asyncpg.Pool
) -> None:
    client, auth = secured
    hook = (await client.post("/v1/webhooks", json=HOOK, headers=auth[A, Scope.ADMIN])).json()
    await client.put("/v1/skus/tea", json={"on_hand": 5}, headers=auth[A, Scope.ADMIN])
    path = f"/v1/webhooks/{hook['id']}"
    before = await table(wh_pg)
    b = auth[B, Scope.ADMIN]

    for response in (
        await client.get(path, headers=b),
        await client.patch(path, json={"url": "https://evil.test/"}, headers=b),
        await client.delete(path, headers=b),
        await client.get(f"{path}/deliveries", headers=b),
        await client.get("/v1/webhooks/wh_aaaaaaaaaaaaaaaa", headers=b),  # and one that never existed: the same
    ):
        assert response.status_code == 404 and response.json()["code"] == "webhook_not_found", response.text
    assert (await client.get("/v1/webhooks", headers=b)).json() == {"webhooks": []}
    # A's SKU does not exist for B
    alerts = await client.put("/v1/skus/tea/alerts", json={"low_stock_threshold": 2}, headers=b)
    assert alerts.status_code == 404 and alerts.json()["code"] == "sku_not_found"
    assert await table(wh_pg) == before
    assert await wh_pg.fetchval("SELECT count(*) FROM sku_alert") == 0
