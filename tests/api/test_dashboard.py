"""The live dashboard's figures (GET /v1/dashboard) and its page (GET /dashboard), against the real app on
real Redis and PostgreSQL. The page in a real browser during a sale: tests/loadtests/test_dashboard_in_a_browser.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from app.config import Settings
from app.main import create_app
from app.stock import dashboard
from app.stock.buckets import SplitMap, first_bucket
from app.stock.dashboard import DashboardQuery, DashboardReader
from app.stock.keys import KeySpace
from app.stock.schemas import SkuSettings
from app.stock.service import StockService
from tests.conftest import TENANT
from tests.helpers import put_sku, req, reserve, sku_state, snapshot

FIGURES = ("on_hand", "held", "sold", "backordered", "available")


async def read(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get("/v1/dashboard", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def rows(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["sku"]: s for s in board["skus"]}


async def test_each_sku_shows_the_same_live_figures_as_its_own_endpoint(client: httpx.AsyncClient) -> None:
    await put_sku(client, "mug", on_hand=10)
    await put_sku(client, "cap", on_hand=5, safety_stock=1)
    held = await reserve(client, "u1", ("mug", 3))
    assert held.status_code == 201, held.text
    paid = await reserve(client, "u2", ("mug", 2))
    assert (await client.post(f"/v1/reservations/{paid.json()['id']}/confirm")).status_code == 200

    # named: read from Redis at once, whether or not PostgreSQL has the SKUs yet, in the order named
    board = await read(client, sku=["mug", "cap"])

    assert [s["sku"] for s in board["skus"]] == ["mug", "cap"]
    for name in ("mug", "cap"):
        state = await sku_state(client, name)
        row = rows(board)[name]
        assert {f: row[f] for f in FIGURES} == {f: state[f] for f in FIGURES}
        assert row["mode"] == state["mode"] and row["buckets"] == 1 and row["ready"] is True
    assert rows(board)["mug"] | {"mode": None} == {
        "sku": "mug",
        "on_hand": 10,
        "held": 3,
        "sold": 2,
        "backordered": 0,
        "available": 5,
        "mode": None,
        "buckets": 1,
        "ready": True,
    }
    assert rows(board)["cap"]["available"] == 4  # safety stock kept back
    assert board["tenant"] == TENANT and abs(board["at_ms"] - time.time() * 1000) < 5_000


async def test_unnamed_the_most_recently_changed_skus_come_first_up_to_the_limit(
    client: httpx.AsyncClient, pg: asyncpg.Pool
) -> None:
    for name in ("a1", "a2", "a3"):
        await put_sku(client, name, on_hand=4)
        await _wait_for_row(pg, name)
    assert (await reserve(client, "u1", ("a1", 1))).status_code == 201  # a1 changes last
    await _wait_until(pg, "SELECT held FROM sku WHERE tenant = $1 AND sku = 'a1'", 1)

    board = await read(client)
    two = await read(client, limit=2)

    assert [s["sku"] for s in board["skus"]] == ["a1", "a3", "a2"]
    assert board["skus_truncated"] is False
    assert [s["sku"] for s in two["skus"]] == ["a1", "a3"]
    assert two["skus_truncated"] is True
    assert rows(board)["a1"]["held"] == 1 and rows(board)["a1"]["available"] == 3


async def test_a_split_sku_is_one_row_summing_its_buckets_and_no_bucket_is_listed(
    pg: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    await put_sku(client, "dash-split-a", on_hand=30)
    split = await client.put("/v1/skus/dash-split-a/split", json={"buckets": 3})
    assert split.status_code == 200, split.text
    for i in range(6):
        assert (await reserve(client, f"user-{i}", ("dash-split-a", 2))).status_code == 201
    await _wait_until(pg, "SELECT count(*) FROM sku WHERE tenant = $1 AND sku LIKE 'dash-split-a~%'", 2)

    unnamed = await read(client)
    named = await read(client, sku="dash-split-a")
    state = await sku_state(client, "dash-split-a")

    assert [s["sku"] for s in unnamed["skus"]] == ["dash-split-a"]  # its buckets ~1 and ~2 are internal
    for board in (unnamed, named):
        row = rows(board)["dash-split-a"]
        assert {f: row[f] for f in FIGURES} == {f: state[f] for f in FIGURES}
        assert (row["on_hand"], row["held"], row["buckets"]) == (30, 12, 3)
    assert sum(1 for b in state["split"]["per_bucket"] if b["held"]) >= 2  # really held in several buckets


async def test_holds_about_to_expire_soonest_first_with_their_lines_and_the_tenants_own_only(
    client: httpx.AsyncClient, service: StockService
) -> None:
    await put_sku(client, "short", on_hand=10, hold_ttl_seconds=30)
    await put_sku(client, "long", on_hand=10, hold_ttl_seconds=600)
    await put_sku(client, "later", on_hand=10, hold_ttl_seconds=20)
    first = (await reserve(client, "alice", ("short", 2), ("long", 1))).json()  # the shortest TTL wins: 30 s
    second = (await reserve(client, "bob", ("later", 1))).json()  # 20 s: due before the first
    await reserve(client, "carol", ("long", 4))  # 600 s: outside a 60 s window
    paid = (await reserve(client, "dave", ("short", 1))).json()
    assert (await client.post(f"/v1/reservations/{paid['id']}/confirm")).status_code == 200  # no deadline now
    # another tenant's hold due even sooner (every shard's index is read): never shown
    await service.put_sku("tenant-x", "short", SkuSettings(on_hand=5, hold_ttl_seconds=10), None)
    await service.reserve("tenant-x", req("mallory", ("short", 1)))

    board = await read(client, within_seconds=60)

    expiring = board["expiring"]
    assert expiring["within_seconds"] == 60
    assert [h["reservation_id"] for h in expiring["holds"]] == [second["id"], first["id"]]
    assert expiring["count"] == 2 and expiring["count_is_lower_bound"] is False
    bob, alice = expiring["holds"]
    assert bob["user_id"] == "bob" and bob["lines"] == [{"sku": "later", "quantity": 1}]
    assert alice["user_id"] == "alice"
    assert sorted(alice["lines"], key=lambda line: line["sku"]) == [
        {"sku": "long", "quantity": 1},
        {"sku": "short", "quantity": 2},
    ]
    assert 0 < bob["seconds_left"] <= 20 < alice["seconds_left"] <= 30
    assert alice["expires_at"] == first["expires_at"]
    assert (await read(client, within_seconds=700))["expiring"]["count"] == 3
    assert (await read(client, within_seconds=700, holds=1))["expiring"]["holds"][0]["user_id"] == "bob"


async def test_a_shard_with_more_due_holds_than_one_read_lists_none_past_where_it_stopped(
    client: httpx.AsyncClient, keys: KeySpace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard, "EXPIRY_SCAN_PER_SHARD", 2)
    crowded = "crowded"
    quiet = next(
        f"quiet-{i}" for i in range(100) if keys.shard_of(TENANT, f"quiet-{i}") != keys.shard_of(TENANT, crowded)
    )
    await put_sku(client, crowded, on_hand=10, hold_ttl_seconds=30)
    await put_sku(client, quiet, on_hand=10, hold_ttl_seconds=40)
    ids = []
    for user in ("u1", "u2", "u3"):
        ids.append((await reserve(client, user, (crowded, 1))).json()["id"])
        await asyncio.sleep(0.005)  # three distinct deadlines
    assert (await reserve(client, "u4", (quiet, 1))).status_code == 201  # due after all three, on another shard

    expiring = (await read(client))["expiring"]

    # one read of the crowded shard stopped at u2's deadline: u3's (unread) comes before u4's (read), so the
    # list stops before u2's and shows no hold after one it did not read
    assert expiring["count_is_lower_bound"] is True
    assert expiring["count"] == 3  # u1, u2 and u4: what one read saw
    assert [h["reservation_id"] for h in expiring["holds"]] == [ids[0]]
    monkeypatch.setattr(dashboard, "EXPIRY_SCAN_PER_SHARD", 4)
    whole = (await read(client))["expiring"]
    assert (whole["count"], whole["count_is_lower_bound"]) == (4, False)
    assert [h["user_id"] for h in whole["holds"]] == ["u1", "u2", "u3", "u4"]


@pytest_asyncio.fixture
async def without_worker(settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    """The app with no write-behind worker: its events wait in the streams."""
    application = create_app(settings.model_copy(update={"worker_in_process": False}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as http:
            yield http


async def test_the_write_behind_lag_is_the_age_of_the_oldest_event_not_yet_in_postgresql(
    without_worker: httpx.AsyncClient,
) -> None:
    idle = await read(without_worker)
    assert idle["write_behind"] == {
        "unpersisted_events": 0,
        "oldest_unpersisted_age_seconds": 0.0,
        "shards": 16,
        "shards_ready": 16,
    }
    await put_sku(without_worker, "lagging", on_hand=3)  # one event
    assert (await reserve(without_worker, "u1", ("lagging", 1))).status_code == 201  # and another
    await asyncio.sleep(0.3)

    waiting = (await read(without_worker, sku="lagging"))["write_behind"]

    assert waiting["unpersisted_events"] == 2
    assert 0.3 <= waiting["oldest_unpersisted_age_seconds"] < 30


async def test_a_sku_on_a_shard_awaiting_its_rebuild_shows_no_figures_rather_than_wrong_ones(
    redis: Redis, pg: asyncpg.Pool, service: StockService, keys: KeySpace
) -> None:
    await service.put_sku(TENANT, "lost", SkuSettings(on_hand=7), None)
    await service.put_sku(TENANT, "kept", SkuSettings(on_hand=2), None)
    lost_shard = keys.shard_of(TENANT, "lost")
    assert keys.shard_of(TENANT, "kept") != lost_shard
    await redis.delete(keys.ready(lost_shard))
    reader = DashboardReader(redis, pg, keys, SplitMap(redis, pg, keys))

    board = await reader.read(TENANT, DashboardQuery(skus=("lost", "kept")))

    lost, kept = board.skus
    assert (lost.ready, lost.on_hand, lost.available, lost.sold) == (False, None, None, None)
    assert (kept.ready, kept.on_hand, kept.available) == (True, 2, 2)
    assert board.write_behind.shards_ready == 15


async def test_a_named_sku_that_does_not_exist_is_a_404_naming_it(client: httpx.AsyncClient) -> None:
    await put_sku(client, "real", on_hand=1)

    response = await client.get("/v1/dashboard", params={"sku": ["real", "ghost"]})

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "sku_not_found" and response.json()["sku"] == "ghost"


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 101},
        {"limit": "many"},
        {"within_seconds": 0},
        {"within_seconds": 3601},
        {"holds": -1},
        {"holds": 101},
        {"sku": "has space"},
        {"sku": "bucket~1"},  # a bucket is never a client's SKU
        {"sku": [f"s{i}" for i in range(21)]},
    ],
    ids=lambda p: "-".join(f"{k}={str(v)[:12]}" for k, v in p.items()),
)
async def test_bad_query_parameters_are_a_422_validation_error_and_change_nothing(
    client: httpx.AsyncClient, redis: Redis, params: dict[str, Any]
) -> None:
    await put_sku(client, "s1", on_hand=1)
    before = await snapshot(redis)

    response = await client.get("/v1/dashboard", params=params)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    assert await snapshot(redis) == before


def _inline_hash(page: str, tag: str) -> str:
    (block,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"


async def test_the_page_is_self_contained_and_its_policy_allows_its_own_script_and_style_only(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/dashboard")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.text
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == _inline_hash(page, "script")
    assert policy["style-src"] == _inline_hash(page, "style")
    assert policy["connect-src"] == "'self'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    assert "/v1/dashboard" in page


async def _wait_for_row(pg: asyncpg.Pool, sku: str) -> None:
    await _wait_until(pg, "SELECT count(*) FROM sku WHERE tenant = $1 AND sku = $2", 1, sku)


async def _wait_until(pg: asyncpg.Pool, query: str, value: int, *args: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while await pg.fetchval(query, TENANT, *args) != value:
        assert time.monotonic() < deadline, f"{query} did not reach {value} in {timeout_s} s"
        await asyncio.sleep(0.05)


async def test_a_hold_spanning_shards_and_buckets_is_one_row_with_a_line_per_sku(
    pg: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    await put_sku(client, "dash-split-b", on_hand=6)
    assert (await client.put("/v1/skus/dash-split-b/split", json={"buckets": 3})).status_code == 200  # 2 free in each
    await put_sku(client, "tea", on_hand=5)
    held = await reserve(client, "ann", ("dash-split-b", 5), ("tea", 1))  # no bucket has 5: spread over all three
    assert held.status_code == 201, held.text

    (hold,) = (await read(client, within_seconds=3600))["expiring"]["holds"]

    assert hold["reservation_id"] == held.json()["id"] and hold["user_id"] == "ann"
    assert sorted(hold["lines"], key=lambda line: line["sku"]) == [
        {"sku": "dash-split-b", "quantity": 5},
        {"sku": "tea", "quantity": 1},
    ]


async def test_a_split_sku_ranks_by_its_latest_change_in_any_bucket(
    pg: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    await put_sku(client, "dash-split-c", on_hand=30)
    assert (await client.put("/v1/skus/dash-split-c/split", json={"buckets": 3})).status_code == 200
    await _wait_until(pg, "SELECT count(*) FROM sku WHERE tenant = $1 AND sku LIKE 'dash-split-c%'", 3)
    await put_sku(client, "cold", on_hand=3)  # changed after every bucket of the split SKU
    await _wait_for_row(pg, "cold")
    assert [s["sku"] for s in (await read(client))["skus"]] == ["cold", "dash-split-c"]

    user = next(f"u{i}" for i in range(1000) if first_bucket(f"u{i}", 3) == 2)
    assert (await reserve(client, user, ("dash-split-c", 1))).status_code == 201  # held in bucket 2 only
    await _wait_until(pg, "SELECT held FROM sku WHERE tenant = $1 AND sku = 'dash-split-c~2'", 1)

    assert [s["sku"] for s in (await read(client))["skus"]] == ["dash-split-c", "cold"]
