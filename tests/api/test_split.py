"""Hot-SKU splitting through the API (issue 7): a SKU spread over K buckets on K shards, reservations routed
by user with fallback and spreading, sold out only when every bucket is, moves between buckets that survive
a crash between their two calls, the catalogue calls on a split SKU, and the split back from PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.recovery.rebuild import Rebuilder
from app.recovery.reconcile import compare
from app.stock.buckets import SplitMap, bucket_sku, first_bucket
from app.stock.keys import KeySpace
from app.stock.service import StockService
from app.stock.splitting import even_targets, plan_moves
from tests.conftest import TENANT
from tests.helpers import put_sku, req, reserve, sku_state, snapshot


async def split(client: httpx.AsyncClient, sku: str, buckets: int) -> dict[str, Any]:
    response = await client.put(f"/v1/skus/{sku}/split", json={"buckets": buckets})
    assert response.status_code == 200, response.text
    return dict(response.json())


def per_bucket(state: dict[str, Any], field: str) -> list[int]:
    return [b[field] for b in state["split"]["per_bucket"]]


def user_for_bucket(bucket: int, buckets: int, prefix: str = "u") -> str:
    return next(f"{prefix}{i}" for i in range(10_000) if first_bucket(f"{prefix}{i}", buckets) == bucket)


def check_invariant(state: dict[str, Any]) -> None:
    for b in state["split"]["per_bucket"]:
        assert b["held"] + b["sold"] <= b["on_hand"], b
        assert b["available"] >= 0, b
    assert state["on_hand"] == sum(per_bucket(state, "on_hand"))


def test_even_targets_and_the_moves_that_reach_them() -> None:
    assert even_targets([10, 0, 0], 3) == [4, 3, 3]
    assert even_targets([1, 2, 7, 5], 2) == [8, 7, 0, 0]  # the buckets past a lowered split are drained
    free = [10, 0, 0]
    moves = plan_moves(free, even_targets(free, 3))
    assert sorted(moves) == [(0, 1, 3), (0, 2, 3)]
    assert plan_moves([3, 3, 4], [4, 3, 3]) == [(2, 0, 1)]
    assert plan_moves([4, 3, 3], [4, 3, 3]) == []


async def test_a_split_spreads_the_units_over_buckets_on_different_shards(
    pg: asyncpg.Pool, client: httpx.AsyncClient, keys: KeySpace, app: FastAPI
) -> None:
    await put_sku(client, "split-a", on_hand=10, hold_ttl_seconds=60, max_per_order=5)

    state = await split(client, "split-a", 3)

    assert (state["on_hand"], state["available"], state["held"]) == (10, 10, 0)
    assert state["split"]["buckets"] == 3
    assert per_bucket(state, "on_hand") == [4, 3, 3]
    shards = per_bucket(state, "shard")
    assert len(set(shards)) == 3 and shards[0] == keys.shard_of(TENANT, "split-a")
    assert await sku_state(client, "split-a") == state
    # the buckets carry the SKU's settings
    for i in (1, 2):
        bucket = await app.state.service.get_bucket(TENANT, bucket_sku("split-a", i))
        assert (bucket.hold_ttl_seconds, bucket.max_per_order, bucket.safety_stock) == (60, 5, 0)
    assert await pg.fetchval("SELECT buckets FROM sku_split WHERE sku = 'split-a'") == 3


async def test_a_user_reserves_from_their_bucket_and_falls_back_to_the_others(
    pg: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    # given 3 units over 3 buckets, one each
    await put_sku(client, "split-b", on_hand=3)
    await split(client, "split-b", 3)
    ann = user_for_bucket(1, 3, "ann")

    # when ann reserves: her own bucket first
    first = await reserve(client, ann, ("split-b", 1))
    assert first.status_code == 201, first.text
    assert first.json()["items"] == [
        {"sku": "split-b", "quantity": 1, "backorder": False, "backordered": 0, "eta": None}
    ]
    assert per_bucket(await sku_state(client, "split-b"), "held") == [0, 1, 0]

    # then with her bucket empty, she still gets a unit from another, and then the last one
    assert (await reserve(client, ann, ("split-b", 1))).status_code == 201
    assert (await reserve(client, ann, ("split-b", 1))).status_code == 201
    state = await sku_state(client, "split-b")
    assert (state["held"], state["available"], per_bucket(state, "held")) == (3, 0, [1, 1, 1])

    # and only when every bucket is empty is the SKU sold out, under its own name
    refused = await reserve(client, ann, ("split-b", 1))
    assert (refused.status_code, refused.json()["code"]) == (409, "insufficient_stock")
    assert refused.json()["items"] == [{"sku": "split-b", "requested": 1, "available": 0}]

    # and the reservation reads, confirms and releases under the SKU's name
    rid = first.json()["id"]
    got = (await client.get(f"/v1/reservations/{rid}")).json()
    assert (got["status"], got["items"][0]["sku"]) == ("held", "split-b")
    assert (await client.post(f"/v1/reservations/{rid}/confirm")).json()["status"] == "confirmed"
    state = await sku_state(client, "split-b")
    assert (state["held"], state["sold"]) == (2, 1)


async def test_a_line_no_bucket_covers_alone_is_spread_and_a_line_they_cannot_cover_changes_nothing(
    pg: asyncpg.Pool, client: httpx.AsyncClient, redis: Redis
) -> None:
    await put_sku(client, "split-c", on_hand=9)
    await split(client, "split-c", 3)  # 3 + 3 + 3

    # a line of 10: more than all the buckets hold together
    before = await snapshot(redis)
    refused = await reserve(client, "bob", ("split-c", 10), ("other-missing", 1))
    assert refused.status_code == 404  # the unknown SKU is refused first, nothing held
    refused = await reserve(client, "bob", ("split-c", 10))
    assert (refused.status_code, refused.json()["items"]) == (
        409,
        [{"sku": "split-c", "requested": 10, "available": 9}],
    )
    assert await snapshot(redis) == before

    # a line of 7: no bucket has it, the three together do
    spread = await reserve(client, "bob", ("split-c", 7))
    assert spread.status_code == 201, spread.text
    assert [(i["sku"], i["quantity"]) for i in spread.json()["items"]] == [("split-c", 7)]
    state = await sku_state(client, "split-c")
    assert (state["held"], state["available"], sorted(per_bucket(state, "held"))) == (7, 2, [1, 3, 3])

    # released whole
    rid = spread.json()["id"]
    assert (await client.post(f"/v1/reservations/{rid}/release")).json()["status"] == "released"
    assert (await sku_state(client, "split-c"))["available"] == 9


async def test_1000_buyers_on_a_split_sku_take_exactly_what_exists(pg: asyncpg.Pool, client: httpx.AsyncClient) -> None:
    # given 100 units over 3 buckets
    await put_sku(client, "split-hot", on_hand=100)
    await split(client, "split-hot", 3)

    # when 1,000 buyers race for one unit each, in waves of 250
    responses: list[httpx.Response] = []
    for wave in range(0, 1000, 250):
        responses += await asyncio.gather(
            *(reserve(client, f"buyer{i}", ("split-hot", 1)) for i in range(wave, wave + 250))
        )

    # then exactly 100 won, every refusal is for stock, and every bucket kept the invariant
    assert sum(r.status_code == 201 for r in responses) == 100
    assert all(r.json()["code"] == "insufficient_stock" for r in responses if r.status_code != 201)
    state = await sku_state(client, "split-hot")
    assert (state["held"], state["available"], state["on_hand"]) == (100, 0, 100)
    check_invariant(state)
    assert per_bucket(state, "held") == [34, 33, 33]


async def test_rebalancing_while_buyers_race_never_oversells(pg: asyncpg.Pool, client: httpx.AsyncClient) -> None:
    # given 60 units over 3 buckets
    await put_sku(client, "split-move", on_hand=60)
    await split(client, "split-move", 3)
    stop = asyncio.Event()

    async def rebalance_all_along() -> int:
        done = 0
        while not stop.is_set():
            response = await client.post("/v1/skus/split-move/rebalance")
            assert response.status_code == 200, response.text
            check_invariant(response.json())
            done += 1
        return done

    # when 300 buyers race for 1 unit each, all of them users of bucket 0, while rebalances run
    mover = asyncio.create_task(rebalance_all_along())
    users = [u for u in (f"m{i}" for i in range(3000)) if first_bucket(u, 3) == 0][:300]
    responses = await asyncio.gather(*(reserve(client, u, ("split-move", 1)) for u in users))
    stop.set()
    rebalances = await mover

    # then exactly 60 won; the on-hand units still add up to 60
    assert rebalances >= 1
    assert sum(r.status_code == 201 for r in responses) == 60
    state = await sku_state(client, "split-move")
    assert (state["on_hand"], state["held"], state["available"]) == (60, 60, 0)
    check_invariant(state)


async def test_a_move_cut_between_its_two_calls_is_finished_once_by_the_next_rebalance(
    pg: asyncpg.Pool, client: httpx.AsyncClient, app: FastAPI
) -> None:
    # given 6 units over 2 buckets (3 + 3)
    await put_sku(client, "split-cut", on_hand=6)
    await split(client, "split-cut", 2)
    splitter = app.state.service.splitter

    # when a move of 2 from bucket 1 to bucket 0 is written and its first call made, then "the process dies"
    await pg.execute(
        "INSERT INTO bucket_move (id, tenant, sku, from_bucket, to_bucket, units)"
        " VALUES ('mv_cut', $1, 'split-cut', 1, 0, 2)",
        TENANT,
    )
    await splitter._adjust_step(TENANT, "split-cut", "mv_cut", "out", 1, -2, "mv_cut: bucket 1 -> bucket 0")
    cut = await sku_state(client, "split-cut")
    assert (cut["on_hand"], per_bucket(cut, "on_hand")) == (4, [3, 1])  # 2 units in neither bucket: sells less

    # then the next rebalance finishes it (the first call replays, the second is made) and evens out
    state = (await client.post("/v1/skus/split-cut/rebalance")).json()
    assert (state["on_hand"], per_bucket(state, "on_hand")) == (6, [3, 3])
    row = await pg.fetchrow("SELECT outcome, finished_at FROM bucket_move WHERE id = 'mv_cut'")
    assert row["outcome"] == "moved" and row["finished_at"] is not None

    # and replaying the finished move's calls again moves nothing twice
    await splitter._run_move(TENANT, "split-cut", "mv_cut", 1, 0, 2)
    assert (await sku_state(client, "split-cut"))["on_hand"] == 6


async def test_catalogue_calls_on_a_split_sku_mean_the_whole_sku(
    pg: asyncpg.Pool, client: httpx.AsyncClient, app: FastAPI
) -> None:
    await put_sku(client, "split-cat", on_hand=9)
    await split(client, "split-cat", 3)
    held = await reserve(client, user_for_bucket(2, 3), ("split-cat", 3))
    assert held.status_code == 201

    # a restock goes in and is spread
    state = (await client.post("/v1/skus/split-cat/adjustments", json={"delta": 6, "reason": "truck"})).json()
    assert (state["on_hand"], state["available"]) == (15, 12)
    assert sorted(per_bucket(state, "available")) == [4, 4, 4]

    # a shrink takes free units from wherever they are; one below what is held is refused, changing nothing
    state = (await client.post("/v1/skus/split-cat/adjustments", json={"delta": -10, "reason": "damaged"})).json()
    assert (state["on_hand"], state["available"]) == (5, 2)
    too_far = await client.post("/v1/skus/split-cat/adjustments", json={"delta": -3, "reason": "damaged"})
    assert (too_far.status_code, too_far.json()["code"]) == (409, "stock_conflict")
    assert (await sku_state(client, "split-cat"))["on_hand"] == 5

    # a PUT's on_hand is the total; its settings reach every bucket
    put = await client.put("/v1/skus/split-cat", json={"on_hand": 12, "hold_ttl_seconds": 120})
    assert put.status_code == 200, put.text
    assert (put.json()["on_hand"], put.json()["available"], put.json()["hold_ttl_seconds"]) == (12, 9, 120)
    check_invariant(put.json())
    for i in (1, 2):
        bucket = await app.state.service.get_bucket(TENANT, bucket_sku("split-cat", i))
        assert bucket.hold_ttl_seconds == 120

    # a receipt is a restock
    receipt = await client.post("/v1/skus/split-cat/receipts", json={"quantity": 3})
    assert (receipt.status_code, receipt.json()["on_hand"], receipt.json()["filled"]) == (200, 15, 0)


async def test_what_needs_the_stock_in_one_place_is_refused_with_nothing_changed(
    pg: asyncpg.Pool, client: httpx.AsyncClient, redis: Redis
) -> None:
    await put_sku(client, "split-lim", on_hand=10, per_user_limit=2)
    await put_sku(client, "split-ok", on_hand=10)
    await split(client, "split-ok", 2)
    before = await snapshot(redis)

    cases = [
        (client.put("/v1/skus/split-lim/split", json={"buckets": 2}), 409, "split_conflict"),
        (client.put("/v1/skus/split-ok", json={"on_hand": 10, "per_user_limit": 1}), 409, "split_conflict"),
        (
            client.put("/v1/skus/split-ok", json={"on_hand": 10, "presale": {"cap": 5, "eta": "2027-01-01T00:00:00Z"}}),
            409,
            "split_conflict",
        ),
        (client.put("/v1/skus/split-ok/channels/web", json={"quota": 1}), 409, "split_conflict"),
        (client.put("/v1/skus/split-ok/split", json={"buckets": 17}), 422, "validation_error"),
        (client.put("/v1/skus/split-ok/split", json={"buckets": 0}), 422, "validation_error"),
        (client.put("/v1/skus/split-ok/split", json={"buckets": "2"}), 422, "validation_error"),
        (client.put("/v1/skus/nothing/split", json={"buckets": 2}), 404, "sku_not_found"),
        (client.post("/v1/skus/split-lim/rebalance"), 409, "split_conflict"),
        (client.post("/v1/skus/nothing/rebalance"), 404, "sku_not_found"),
    ]
    for call, status, code in cases:
        response = await call
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert await snapshot(redis) == before


async def test_more_buckets_than_shards_is_refused(pg: asyncpg.Pool, service: StockService, redis: Redis) -> None:
    from app.stock.errors import SplitConflict
    from app.stock.schemas import SkuSettings
    from app.stock.splitting import Splitter

    service.splits = SplitMap(redis, pg, service.keys)
    service.splitter = Splitter(service, pg, service.splits, 3600)
    await service.put_sku(TENANT, "split-many", SkuSettings(on_hand=5))
    with pytest.raises(SplitConflict):
        await service.splitter.put_split(TENANT, "split-many", service.keys.shard_count + 1)


async def test_unsplitting_gathers_the_units_back_and_drains_as_holds_end(
    pg: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    await put_sku(client, "split-back", on_hand=9)
    await split(client, "split-back", 3)
    held = await reserve(client, user_for_bucket(2, 3), ("split-back", 2))
    assert held.status_code == 201

    state = await split(client, "split-back", 1)

    # every free unit is back in bucket 0; bucket 2 keeps only what is held there
    assert per_bucket(state, "available") == [7, 0, 0]
    assert per_bucket(state, "routed") == [True, False, False]
    assert (state["on_hand"], state["held"], state["available"]) == (9, 2, 7)
    # reservations go to bucket 0 only now
    assert (await reserve(client, user_for_bucket(2, 3, "z"), ("split-back", 7))).status_code == 201
    # the hold in bucket 2 ends; the next rebalance brings its unit back where it is sold
    assert (await client.post(f"/v1/reservations/{held.json()['id']}/release")).status_code == 200
    state = (await client.post("/v1/skus/split-back/rebalance")).json()
    assert per_bucket(state, "available") == [2, 0, 0]


async def test_a_retry_after_a_crash_finds_the_bucket_an_earlier_attempt_held(
    pg: asyncpg.Pool, client: httpx.AsyncClient, app: FastAPI
) -> None:
    await put_sku(client, "split-retry", on_hand=2)
    await split(client, "split-retry", 2)
    service: StockService = app.state.service
    ann = user_for_bucket(0, 2, "ann")
    assert (
        await reserve(client, user_for_bucket(0, 2, "zed"), ("split-retry", 1))
    ).status_code == 201  # bucket 0 empty

    # when an attempt under a claimed id falls back to bucket 1 and "crashes" before answering
    rid = service.new_reservation_id(TENANT, req(ann, ("split-retry", 1)))
    first = await service.reserve(TENANT, req(ann, ("split-retry", 1)), rid)
    # and the retry runs with the same claimed id
    again = await service.reserve(TENANT, req(ann, ("split-retry", 1)), rid, retry=True)

    # then it answers the same reservation, held once
    assert again.id == first.id != rid
    state = await sku_state(client, "split-retry")
    assert (state["held"], state["available"]) == (2, 0)


async def test_an_idempotency_key_replays_a_reservation_made_in_another_bucket(
    pg: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    await put_sku(client, "split-key", on_hand=2)
    await split(client, "split-key", 2)
    assert (await reserve(client, user_for_bucket(1, 2, "zed"), ("split-key", 1))).status_code == 201
    body = {"user_id": user_for_bucket(1, 2, "ann"), "items": [{"sku": "split-key", "quantity": 1}]}

    first = await client.post("/v1/reservations", json=body, headers={"idempotency-key": "k-split"})
    replay = await client.post("/v1/reservations", json=body, headers={"idempotency-key": "k-split"})

    assert first.status_code == replay.status_code == 201
    assert first.json() == replay.json()
    assert (await sku_state(client, "split-key"))["held"] == 2


async def test_the_split_comes_back_from_postgresql_and_other_processes_learn_it(
    pg: asyncpg.Pool, client: httpx.AsyncClient, redis: Redis, keys: KeySpace, app: FastAPI
) -> None:
    # given a split SKU with a hold and a sale, all persisted
    await put_sku(client, "split-pg", on_hand=12)
    other = SplitMap(redis, pg, keys)
    await other.load()
    await split(client, "split-pg", 3)
    sold = await reserve(client, user_for_bucket(1, 3), ("split-pg", 2))
    assert (await client.post(f"/v1/reservations/{sold.json()['id']}/confirm")).status_code == 200
    assert (await reserve(client, user_for_bucket(2, 3), ("split-pg", 3))).status_code == 201
    rebuilder = Rebuilder(redis, pg, keys)
    await rebuilder.drain(list(keys.all_shards()))
    assert await compare(redis, pg, keys) == []
    before = await sku_state(client, "split-pg")

    # then another process's map learns the split from the version bump
    assert other.get(TENANT, "split-pg") is None
    assert await other.refresh_once() is True
    assert other.get(TENANT, "split-pg") is not None and other.get(TENANT, "split-pg").buckets == 3  # type: ignore[union-attr]

    # when Redis loses everything and every shard is rebuilt
    await redis.flushdb()
    assert sorted(await rebuilder.rebuild(list(keys.all_shards()))) == list(keys.all_shards())

    # then the buckets are back, and a fresh map (the version key is gone) still knows the split
    fresh = SplitMap(redis, pg, keys)
    await fresh.load()
    assert fresh.get(TENANT, "split-pg") is not None
    assert await sku_state(client, "split-pg") == before
    assert (await reserve(client, "after", ("split-pg", 7))).status_code == 201  # spread over all three
    assert (await sku_state(client, "split-pg"))["available"] == 0
