"""Issue 5: API keys with scopes and strict tenant isolation, on every endpoint, with every scope.

Two tenants, A and B, each with an admin, a checkout and a read key, against the real app with keys
required (Redis and PostgreSQL real). For every /v1 endpoint, including POST /v1/reservations both as
the hot path answers it and as FastAPI does (a body the hot path hands over):

- no key, another scheme, a malformed key, an unknown id, a wrong secret, a revoked key: 401
  ``unauthenticated`` with a Bearer challenge, and Redis exactly as it was;
- a key whose scope does not allow the call: 403 ``forbidden``, on its own data and on the other
  tenant's alike (so 403 says nothing of what exists), Redis exactly as it was;
- a key whose scope allows it: 2xx on its own tenant's data; 404 on the other tenant's (the same answer
  as for data that does not exist), Redis exactly as it was. PUT /v1/skus/{sku} cannot be 404 (it creates):
  A's PUT of B's SKU name creates A's own SKU of that name, and B's is untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from app.api.hot_path import _parse
from app.auth.scopes import Scope
from app.auth.store import KeyStore
from app.auth.tokens import ApiKey
from app.config import Settings
from app.main import create_app
from app.stock.keys import KeySpace
from app.stock.reservation_ids import home_shard_of
from tests.conftest import SHARDS
from tests.helpers import snapshot

A, B = "tenant-a", "tenant-b"
KEYS = KeySpace(SHARDS)
SKU = {A: "a-sku", B: "b-sku"}
LISTING = {A: "a-box", B: "b-box"}  # each tenant's listing: 2 of its SKU
OTHER = {A: B, B: A}
JSON = {"content-type": "application/json"}
UTF8_BOM = b"\xef\xbb\xbf"  # orjson refuses it, the json module FastAPI uses accepts it


@dataclass
class World:
    client: httpx.AsyncClient
    redis: Redis
    keys: dict[tuple[str, Scope], ApiKey]
    revoked: ApiKey
    reservation: dict[str, str]  # tenant -> a live (held) reservation id

    def auth(self, tenant: str, scope: Scope) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[tenant, scope].token}"}


@pytest_asyncio.fixture
async def world(settings: Settings, redis: Redis, pg_pool: asyncpg.Pool) -> AsyncIterator[World]:
    """The app with keys required; tenants A and B each with a SKU (10 units) and a held reservation."""
    await pg_pool.execute("TRUNCATE api_key, tenant, listing")
    store = KeyStore(pg_pool)
    keys = {(t, s): (await store.create(t, s, f"{t} {s}"))[1] for t in (A, B) for s in Scope}
    revoked_record, revoked = await store.create(A, Scope.ADMIN, "revoked")
    await store.revoke(revoked_record.id)
    application = create_app(settings.model_copy(update={"require_auth": True}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as client:
            w = World(client, redis, keys, revoked, {})
            for tenant in (A, B):
                admin = w.auth(tenant, Scope.ADMIN)
                put = await client.put(f"/v1/skus/{SKU[tenant]}", json={"on_hand": 10}, headers=admin)
                assert put.status_code == 201, put.text
                box = {"components": [{"sku": SKU[tenant], "quantity": 2}]}
                listed = await client.put(f"/v1/listings/{LISTING[tenant]}", json=box, headers=admin)
                assert listed.status_code == 201, listed.text
                held = await client.post(
                    "/v1/reservations",
                    json={"user_id": "u1", "items": [{"sku": SKU[tenant], "quantity": 2}]},
                    headers=w.auth(tenant, Scope.CHECKOUT),
                )
                assert held.status_code == 201, held.text
                w.reservation[tenant] = held.json()["id"]
            yield w


# -- the endpoints --------------------------------------------------------------------------------------
# Each call acts on `owner`'s data (its SKU or its reservation) with the given headers.

Call = Callable[[World, str, dict[str, str]], Awaitable[httpx.Response]]


def reserve_body(sku: str) -> dict[str, Any]:
    return {"user_id": "u2", "items": [{"sku": sku, "quantity": 1}]}


async def put_sku(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.put(f"/v1/skus/{SKU[owner]}", json={"on_hand": 20}, headers=headers)


async def adjust(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    body = {"delta": 1, "reason": "restock"}
    return await w.client.post(f"/v1/skus/{SKU[owner]}/adjustments", json=body, headers=headers)


async def put_channel(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.put(f"/v1/skus/{SKU[owner]}/channels/web", json={"quota": 1}, headers=headers)


async def receive(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.post(f"/v1/skus/{SKU[owner]}/receipts", json={"quantity": 2}, headers=headers)


async def put_split(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    # one bucket: the call's whole path (tenant, scope, the SKU's existence) without leaving a split behind
    return await w.client.put(f"/v1/skus/{SKU[owner]}/split", json={"buckets": 1}, headers=headers)


async def rebalance(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.post(f"/v1/skus/{SKU[owner]}/rebalance", headers=headers)


async def get_sku(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.get(f"/v1/skus/{SKU[owner]}", headers=headers)


async def read_dashboard(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.get("/v1/dashboard", params={"sku": SKU[owner]}, headers=headers)


async def reserve_hot(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.post("/v1/reservations", json=reserve_body(SKU[owner]), headers=headers)


async def reserve_fastapi(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    body = UTF8_BOM + httpx.Request("POST", "/", json=reserve_body(SKU[owner])).content
    assert _parse(body) is None  # the hot path hands this one to FastAPI
    return await w.client.post("/v1/reservations", content=body, headers={**headers, **JSON})


async def put_listing(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    # A's components whoever's listing name it is: a PUT by A always writes A's own listing
    body = {"components": [{"sku": SKU[A], "quantity": 3}]}
    return await w.client.put(f"/v1/listings/{LISTING[owner]}", json=body, headers=headers)


async def get_listing(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.get(f"/v1/listings/{LISTING[owner]}", headers=headers)


async def reserve_listing(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    body = {"user_id": "u3", "listings": [{"listing": LISTING[owner], "quantity": 1}]}
    return await w.client.post("/v1/reservations", json=body, headers=headers)


async def sku_created_as_own(w: World, headers: dict[str, str]) -> None:
    assert (await get_sku(w, B, headers)).json()["on_hand"] == 20  # A's view of "b-sku": its own


async def listing_created_as_own(w: World, headers: dict[str, str]) -> None:
    own = (await get_listing(w, B, headers)).json()  # A's view of "b-box": its own, A's components
    assert own["components"] == [{"sku": SKU[A], "quantity": 3}]


async def get_reservation(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.get(f"/v1/reservations/{w.reservation[owner]}", headers=headers)


async def confirm(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.post(f"/v1/reservations/{w.reservation[owner]}/confirm", headers=headers)


async def release(w: World, owner: str, headers: dict[str, str]) -> httpx.Response:
    return await w.client.post(f"/v1/reservations/{w.reservation[owner]}/release", headers=headers)


@dataclass(frozen=True)
class Endpoint:
    call: Call
    scopes: frozenset[Scope]  # the scopes allowed to call it (README's table)
    ok: int  # the status on the caller's own data
    not_found: str | None  # the code on the other tenant's data (None: PUT creates instead)
    created: Callable[[World, dict[str, str]], Awaitable[None]] | None = None  # checks a PUT's own copy


READ_SCOPES = frozenset({Scope.READ, Scope.CHECKOUT, Scope.ADMIN})
ENDPOINTS = {
    "PUT /v1/skus/{sku}": Endpoint(put_sku, frozenset({Scope.ADMIN}), 200, None, sku_created_as_own),
    "POST /v1/skus/{sku}/adjustments": Endpoint(adjust, frozenset({Scope.ADMIN}), 200, "sku_not_found"),
    "POST /v1/skus/{sku}/receipts": Endpoint(receive, frozenset({Scope.ADMIN}), 200, "sku_not_found"),
    "PUT /v1/skus/{sku}/channels/{channel}": Endpoint(put_channel, frozenset({Scope.ADMIN}), 201, "sku_not_found"),
    "PUT /v1/skus/{sku}/split": Endpoint(put_split, frozenset({Scope.ADMIN}), 200, "sku_not_found"),
    # on A's own SKU, which is not split: the domain's refusal, reached with A's tenant
    "POST /v1/skus/{sku}/rebalance": Endpoint(rebalance, frozenset({Scope.ADMIN}), 409, "sku_not_found"),
    "GET /v1/skus/{sku}": Endpoint(get_sku, READ_SCOPES, 200, "sku_not_found"),
    "GET /v1/dashboard?sku=": Endpoint(read_dashboard, READ_SCOPES, 200, "sku_not_found"),
    "PUT /v1/listings/{listing}": Endpoint(put_listing, frozenset({Scope.ADMIN}), 200, None, listing_created_as_own),
    "GET /v1/listings/{listing}": Endpoint(get_listing, READ_SCOPES, 200, "listing_not_found"),
    "POST /v1/reservations (hot path)": Endpoint(reserve_hot, frozenset({Scope.CHECKOUT}), 201, "sku_not_found"),
    "POST /v1/reservations (FastAPI)": Endpoint(reserve_fastapi, frozenset({Scope.CHECKOUT}), 201, "sku_not_found"),
    "POST /v1/reservations naming a listing": Endpoint(
        reserve_listing, frozenset({Scope.CHECKOUT}), 201, "listing_not_found"
    ),
    "GET /v1/reservations/{id}": Endpoint(get_reservation, READ_SCOPES, 200, "reservation_not_found"),
    "POST /v1/reservations/{id}/confirm": Endpoint(confirm, frozenset({Scope.CHECKOUT}), 200, "reservation_not_found"),
    "POST /v1/reservations/{id}/release": Endpoint(release, frozenset({Scope.CHECKOUT}), 200, "reservation_not_found"),
}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = dict(response.json())
    assert problem["code"] == code
    assert {"type", "title", "status", "detail", "code"} <= problem.keys()
    return problem


# -- 401: no valid key ----------------------------------------------------------------------------------

BAD_CREDENTIALS: dict[str, Callable[[World], dict[str, str]]] = {
    "missing": lambda w: {},
    "another scheme": lambda w: {"authorization": f"Basic {w.keys[A, Scope.ADMIN].token}"},
    "bearer without a key": lambda w: {"authorization": "Bearer"},
    "malformed": lambda w: {"authorization": "Bearer not-a-key"},
    "unknown id": lambda w: {"authorization": f"Bearer {ApiKey('aaaaaaaaaaaa', w.keys[A, Scope.ADMIN].secret).token}"},
    "wrong secret": lambda w: {"authorization": f"Bearer {ApiKey(w.keys[A, Scope.ADMIN].id, 'x' * 43).token}"},
    "revoked": lambda w: {"authorization": f"Bearer {w.revoked.token}"},
}


@pytest.mark.parametrize("credential", BAD_CREDENTIALS)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_without_a_valid_key_every_endpoint_is_401_and_changes_nothing(
    world: World, endpoint: str, credential: str
) -> None:
    before = await snapshot(world.redis)

    for owner in (A, B):
        response = await ENDPOINTS[endpoint].call(world, owner, BAD_CREDENTIALS[credential](world))

        assert_problem(response, 401, "unauthenticated")
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith("Bearer ")
        assert ('error="invalid_token"' in challenge) == (credential not in ("missing", "another scheme"))
    assert await snapshot(world.redis) == before


# -- 403 and 404: a valid key, every scope --------------------------------------------------------------


def b_state_keys(w: World) -> list[str]:
    """B's SKU, per-user counts, reservation and listing in Redis."""
    shard = KEYS.shard_of(B, SKU[B])
    home = home_shard_of(w.reservation[B], SHARDS)
    assert home is not None
    listing = KEYS.listing(KEYS.shard_of(B, LISTING[B]), B, LISTING[B])
    return [
        KEYS.sku(shard, B, SKU[B]),
        KEYS.user_counts(shard, B, SKU[B]),
        KEYS.reservation(home, w.reservation[B]),
        listing,
    ]


@pytest.mark.parametrize("scope", list(Scope))
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_every_endpoint_with_every_scope(world: World, endpoint: str, scope: Scope) -> None:
    e = ENDPOINTS[endpoint]
    headers = world.auth(A, scope)

    if scope not in e.scopes:
        # a scope that does not allow the call: 403 on A's own data and on B's alike, nothing changed
        before = await snapshot(world.redis)
        for owner in (A, B):
            problem = assert_problem(await e.call(world, owner, headers), 403, "forbidden")
            assert problem["needed_scopes"] == sorted(e.scopes) and problem["key_scopes"] == [scope]
        assert await snapshot(world.redis) == before
        return

    # B's data, as A's key: 404 as if it did not exist, and B's state unchanged
    before = await snapshot(world.redis)
    b_before = {k: before.get(k) for k in b_state_keys(world)}
    b_seen_before = (await get_sku(world, B, world.auth(B, Scope.READ))).json()
    response = await e.call(world, B, headers)
    after = await snapshot(world.redis)
    if e.not_found is None:  # PUT: creates A's own SKU or listing under that name
        assert response.status_code == 201, response.text
        assert e.created is not None
        await e.created(world, headers)
    else:
        assert_problem(response, 404, e.not_found)
        assert after == before
    assert {k: after.get(k) for k in b_state_keys(world)} == b_before
    assert (await get_sku(world, B, world.auth(B, Scope.READ))).json() == b_seen_before

    # A's own data: allowed
    own = await e.call(world, A, headers)
    assert own.status_code == e.ok, own.text


async def test_the_hot_path_refuses_with_the_very_documents_fastapi_does(world: World) -> None:
    for headers in (
        *(make(world) for make in BAD_CREDENTIALS.values()),
        world.auth(A, Scope.READ),
        world.auth(A, Scope.ADMIN),
    ):
        hot = await reserve_hot(world, A, headers)
        routed = await reserve_fastapi(world, A, headers)

        assert hot.status_code in (401, 403)
        assert (hot.status_code, hot.content) == (routed.status_code, routed.content)
        assert hot.headers["www-authenticate"] == routed.headers["www-authenticate"]


async def test_an_idempotency_key_never_replays_another_tenants_answer(world: World) -> None:
    # given B reserved under an Idempotency-Key
    body = {"user_id": "u3", "items": [{"sku": SKU[B], "quantity": 1}]}
    first = await world.client.post(
        "/v1/reservations", json=body, headers={**world.auth(B, Scope.CHECKOUT), "idempotency-key": "k-1"}
    )
    assert first.status_code == 201

    # when A sends the same key and the same body
    replay = await world.client.post(
        "/v1/reservations", json=body, headers={**world.auth(A, Scope.CHECKOUT), "idempotency-key": "k-1"}
    )

    # then A gets its own answer (B's SKU does not exist for A), not B's reservation
    assert_problem(replay, 404, "sku_not_found")
    assert first.json()["id"] not in replay.text


async def test_the_dashboard_shows_a_tenant_its_own_skus_and_holds_only(world: World, pg_pool: asyncpg.Pool) -> None:
    # both tenants' SKUs are in PostgreSQL (the unnamed view lists from there) and both hold a reservation
    for _ in range(200):
        if await pg_pool.fetchval("SELECT count(*) FROM sku WHERE sku = ANY($1::text[])", list(SKU.values())) == 2:
            break
        await asyncio.sleep(0.05)

    for tenant in (A, B):
        response = await world.client.get(
            "/v1/dashboard", params={"within_seconds": 3600}, headers=world.auth(tenant, Scope.READ)
        )

        assert response.status_code == 200, response.text
        board = response.json()
        assert board["tenant"] == tenant
        assert [s["sku"] for s in board["skus"]] == [SKU[tenant]]
        assert [h["reservation_id"] for h in board["expiring"]["holds"]] == [world.reservation[tenant]]
        assert board["expiring"]["count"] == 1


async def test_every_v1_route_declares_the_key_and_its_refusals_and_the_ops_routes_need_none(world: World) -> None:
    doc = (await world.client.get("/openapi.json")).json()

    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    v1 = [(path, op) for path, ops in doc["paths"].items() if path.startswith("/v1/") for op in ops.values()]
    # skus: put, adjust, receive, put channel, split, rebalance, get; listings: put, get; reservations: 4;
    # webhooks: 6, alerts: 2; the dashboard's figures: 1
    assert len(v1) == 13 + 8 + 1
    for path, op in v1:
        assert op.get("security") == [{"ApiKey": []}], path
        assert {"401", "403"} <= op["responses"].keys(), path
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/dashboard"):
        assert (await world.client.get(path)).status_code == 200, path
    assert (await world.client.get("/readyz")).json()["auth"] == "required"
