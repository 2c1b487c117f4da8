"""Invariant 7: retries are safe.

The same Idempotency-Key with the same request replays the first answer (status and body byte for byte)
and changes nothing; the same key with another request is refused with 422 ``idempotency_conflict`` and
changes nothing. Keys are scoped to the method and path they were sent to. A client retrying after the
server died half-way (key claimed, answer never stored) gets one reservation, not two.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.api.routes.reservations import canonical_body
from app.stock.idempotency import IdempotencyRequest, fingerprint
from app.stock.keys import KeySpace
from app.stock.reservation_ids import new_reservation_id
from app.stock.schemas import ReservationRequest
from tests.helpers import put_sku, reserve, sku_state, snapshot

TENANT = "default"
KEYS = KeySpace(16)
APPLE, KIWI, PEAR = "apple", "kiwi", "pear"  # apple and kiwi share a shard, pear is elsewhere
RESERVATIONS = "/v1/reservations"


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def order(user: str, *items: tuple[str, int], **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "items": [{"sku": s, "quantity": q} for s, q in items], **extra}


def assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem.keys() >= {"type", "title", "status", "detail", "code"}, problem
    assert (problem["status"], problem["code"]) == (status, code)


def assert_same_answer(first: httpx.Response, again: httpx.Response) -> None:
    assert again.status_code == first.status_code
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.content == first.content


async def reservation_parts(redis: Redis, rid: str) -> int:
    return len([k async for k in redis.scan_iter(match=f"sh:*:res:{rid}", count=1000)])


async def all_reservation_parts(redis: Redis) -> int:
    return len([k async for k in redis.scan_iter(match="sh:*:res:*", count=1000)])


async def held(client: httpx.AsyncClient, sku: str) -> int:
    return int((await sku_state(client, sku))["held"])


def test_sku_shards_are_what_the_tests_assume() -> None:
    assert KEYS.shard_of(TENANT, APPLE) == KEYS.shard_of(TENANT, KIWI)
    assert KEYS.shard_of(TENANT, APPLE) != KEYS.shard_of(TENANT, PEAR)


# -- POST /v1/reservations ------------------------------------------------------------------------------


async def test_reservation_replay_returns_the_first_answer_and_holds_once(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    await put_sku(client, APPLE, on_hand=10)
    await put_sku(client, PEAR, on_hand=10)
    body = order("alice", (APPLE, 2), (PEAR, 3))

    first = await client.post(RESERVATIONS, json=body, headers=key("checkout-1"))
    assert first.status_code == 201, first.text
    rid = first.json()["id"]
    before = await snapshot(redis)

    again = await client.post(RESERVATIONS, json=body, headers=key("checkout-1"))
    # key order and whitespace are not part of the request: still the same request
    reordered = json.dumps({"items": [{"quantity": 2, "sku": APPLE}, {"quantity": 3, "sku": PEAR}], "user_id": "alice"})
    spaced = await client.post(
        RESERVATIONS,
        content=reordered.replace(",", " ,\n "),
        headers={**key("checkout-1"), "content-type": "application/json"},
    )

    assert_same_answer(first, again)
    assert_same_answer(first, spaced)
    assert again.json()["id"] == rid
    assert await snapshot(redis) == before
    assert (await held(client, APPLE), await held(client, PEAR)) == (2, 3)
    assert await reservation_parts(redis, rid) == 2
    assert await all_reservation_parts(redis) == 2

    # the key made the difference: the same body without it is a second reservation
    other = await client.post(RESERVATIONS, json=body)
    assert other.status_code == 201
    assert other.json()["id"] != rid
    assert (await held(client, APPLE), await held(client, PEAR)) == (4, 6)


@pytest.mark.parametrize(
    "changed",
    [
        order("alice", (APPLE, 3)),  # another quantity
        order("mallory", (APPLE, 2)),  # another user
        order("alice", (APPLE, 2), (KIWI, 1)),  # one more line
        order("alice", (APPLE, 2), channel="web"),  # a channel
    ],
    ids=["quantity", "user", "extra-line", "channel"],
)
async def test_reservation_key_reused_with_another_body_is_refused(
    client: httpx.AsyncClient, redis: Redis, changed: dict[str, Any]
) -> None:
    await put_sku(client, APPLE, on_hand=10)
    await put_sku(client, KIWI, on_hand=10)
    first = await client.post(RESERVATIONS, json=order("alice", (APPLE, 2)), headers=key("checkout-2"))
    assert first.status_code == 201, first.text
    before = await snapshot(redis)

    refused = await client.post(RESERVATIONS, json=changed, headers=key("checkout-2"))

    assert_problem(refused, 422, "idempotency_conflict")
    assert await snapshot(redis) == before
    # the first answer is still there to replay
    assert_same_answer(
        first, await client.post(RESERVATIONS, json=order("alice", (APPLE, 2)), headers=key("checkout-2"))
    )


async def test_replayed_insufficient_stock_stays_409_after_restock(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, APPLE, on_hand=1)
    assert (await reserve(client, "bob", (APPLE, 1))).status_code == 201
    body = order("alice", (APPLE, 1))

    first = await client.post(RESERVATIONS, json=body, headers=key("checkout-3"))
    assert_problem(first, 409, "insufficient_stock")
    restocked = await client.post(f"/v1/skus/{APPLE}/adjustments", json={"delta": 5, "reason": "truck"})
    assert restocked.json()["available"] == 5
    before = await snapshot(redis)

    again = await client.post(RESERVATIONS, json=body, headers=key("checkout-3"))

    assert_same_answer(first, again)
    assert await snapshot(redis) == before
    assert await held(client, APPLE) == 1
    # the stock really is there now: a new key (or none) gets it
    fresh = await client.post(RESERVATIONS, json=body, headers=key("checkout-3b"))
    assert fresh.status_code == 201, fresh.text
    assert await held(client, APPLE) == 2


@pytest.mark.parametrize("skus", [(APPLE,), (APPLE, PEAR)], ids=["one-shard", "two-shards"])
async def test_concurrent_identical_requests_make_one_reservation(
    client: httpx.AsyncClient, redis: Redis, skus: tuple[str, ...]
) -> None:
    for sku in skus:
        await put_sku(client, sku, on_hand=100)
    body = order("alice", *((sku, 3) for sku in skus))

    answers = await asyncio.gather(
        *(client.post(RESERVATIONS, json=body, headers=key("flash-sale-1")) for _ in range(20))
    )

    assert [a.status_code for a in answers] == [201] * 20, [a.text for a in answers if a.status_code != 201]
    assert len({a.json()["id"] for a in answers}) == 1
    assert len({a.content for a in answers}) == 1
    rid = answers[0].json()["id"]
    for sku in skus:
        assert await held(client, sku) == 3
    assert await reservation_parts(redis, rid) == len(skus)
    assert await all_reservation_parts(redis) == len(skus)
    assert_same_answer(answers[0], await client.post(RESERVATIONS, json=body, headers=key("flash-sale-1")))


# -- crash between claim and answer -----------------------------------------------------------------------


def claim_request(body: dict[str, Any], idempotency_key: str) -> IdempotencyRequest:
    """The claim exactly as the route makes it for this body and key."""
    scope = f"POST {RESERVATIONS}"
    canonical = canonical_body(ReservationRequest.model_validate(body))
    return IdempotencyRequest(key=idempotency_key, scope=scope, fingerprint=fingerprint(scope, canonical))


async def test_retry_after_crash_before_reserving_uses_the_claimed_id(
    app: FastAPI, client: httpx.AsyncClient, redis: Redis
) -> None:
    await put_sku(client, APPLE, on_hand=10)
    body = order("alice", (APPLE, 2))
    claimed_id = new_reservation_id(KEYS.shard_of(TENANT, APPLE))
    claim = await app.state.idempotency.claim(TENANT, claim_request(body, "crash-1"), claimed_id)
    assert claim.ref == claimed_id  # the process "dies" here: claimed, nothing reserved, no answer

    retried = await client.post(RESERVATIONS, json=body, headers=key("crash-1"))

    assert retried.status_code == 201, retried.text
    assert retried.json()["id"] == claimed_id
    assert await held(client, APPLE) == 2
    assert await all_reservation_parts(redis) == 1
    assert_same_answer(retried, await client.post(RESERVATIONS, json=body, headers=key("crash-1")))
    assert await held(client, APPLE) == 2


async def test_retry_after_crash_after_reserving_holds_nothing_twice(
    app: FastAPI, client: httpx.AsyncClient, redis: Redis
) -> None:
    await put_sku(client, APPLE, on_hand=10)
    await put_sku(client, PEAR, on_hand=10)
    body = order("alice", (APPLE, 2), (PEAR, 1))
    claimed_id = new_reservation_id(KEYS.shard_of(TENANT, APPLE))
    await app.state.idempotency.claim(TENANT, claim_request(body, "crash-2"), claimed_id)
    # the reservation went through, then the process died before storing the answer
    done = await app.state.service.reserve(TENANT, ReservationRequest.model_validate(body), claimed_id)
    assert done.id == claimed_id
    before = await snapshot(redis)

    retried = await client.post(RESERVATIONS, json=body, headers=key("crash-2"))

    assert retried.status_code == 201, retried.text
    assert retried.json()["id"] == claimed_id
    assert [{"sku": i["sku"], "quantity": i["quantity"]} for i in retried.json()["items"]] == body["items"]
    assert retried.json()["status"] == "held"
    assert (await held(client, APPLE), await held(client, PEAR)) == (2, 1)
    assert await all_reservation_parts(redis) == 2
    # the retry only stored its answer: every counter, hold and event is as the first attempt left it
    after = await snapshot(redis)
    changed = {k for k in after.keys() | before.keys() if after.get(k) != before.get(k)}
    assert all(":idem:" in k for k in changed), changed


async def crash_between_shards(
    app: FastAPI, client: httpx.AsyncClient, body: dict[str, Any], idempotency_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends the request and kills it after the home shard's reserve.lua and before the second shard's.
    A killed process runs nothing more, so every later script call fails too (the service compensates
    on errors it survives; a crash is exactly when it cannot)."""
    scripts = app.state.scripts
    real_call = scripts.call
    reserve_calls = 0

    async def dies_after_home_shard(name: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal reserve_calls
        if name == "reserve":
            reserve_calls += 1
        if reserve_calls >= 2:
            raise ConnectionError("process killed between shards")
        return await real_call(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(scripts, "call", dies_after_home_shard)
        with pytest.raises(ConnectionError):
            await client.post(RESERVATIONS, json=body, headers=key(idempotency_key))
    assert reserve_calls == 2


async def test_retry_after_crash_between_shards_completes_the_reservation_once(
    app: FastAPI, client: httpx.AsyncClient, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put_sku(client, APPLE, on_hand=10)
    await put_sku(client, PEAR, on_hand=10)
    body = order("alice", (APPLE, 2), (PEAR, 1))
    await crash_between_shards(app, client, body, "crash-3", monkeypatch)
    assert (await held(client, APPLE), await held(client, PEAR)) == (2, 0)  # half done

    retried = await client.post(RESERVATIONS, json=body, headers=key("crash-3"))

    assert retried.status_code == 201, retried.text
    rid = retried.json()["id"]
    assert retried.json()["status"] == "held"
    assert [{"sku": i["sku"], "quantity": i["quantity"]} for i in retried.json()["items"]] == body["items"]
    assert (await held(client, APPLE), await held(client, PEAR)) == (2, 1)
    assert await reservation_parts(redis, rid) == 2
    assert await all_reservation_parts(redis) == 2
    assert_same_answer(retried, await client.post(RESERVATIONS, json=body, headers=key("crash-3")))
    assert (await held(client, APPLE), await held(client, PEAR)) == (2, 1)


async def test_retry_after_crash_between_shards_keeps_one_deadline(
    app: FastAPI, client: httpx.AsyncClient, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reservation spanning shards has one deadline (its parts expire together); a retry that finishes
    the reservation must give the new part the deadline the first attempt fixed, not a fresh one."""
    await put_sku(client, APPLE, on_hand=10)
    await put_sku(client, PEAR, on_hand=10)
    body = order("alice", (APPLE, 2), (PEAR, 1))
    await crash_between_shards(app, client, body, "crash-4", monkeypatch)
    await asyncio.sleep(0.05)  # the client's retry comes a moment later

    retried = await client.post(RESERVATIONS, json=body, headers=key("crash-4"))

    assert retried.status_code == 201, retried.text
    rid = retried.json()["id"]
    expires_at_ms = round(datetime.fromisoformat(retried.json()["expires_at"]).timestamp() * 1000)
    deadlines = {}
    for sku in (APPLE, PEAR):
        score = await redis.zscore(KEYS.expiry(KEYS.shard_of(TENANT, sku)), rid)
        assert score is not None
        deadlines[sku] = int(score)
    assert deadlines == {APPLE: expires_at_ms, PEAR: expires_at_ms}


async def test_retry_after_the_half_done_reservation_expired_holds_nothing(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The home part expired while the client waited to retry: the retry must not put a new hold on the
    other shard for a reservation that is already over."""
    await put_sku(client, APPLE, on_hand=10, hold_ttl_seconds=1)
    await put_sku(client, PEAR, on_hand=10, hold_ttl_seconds=1)
    body = order("alice", (APPLE, 2), (PEAR, 1))
    await crash_between_shards(app, client, body, "crash-5", monkeypatch)
    for _ in range(50):  # the sweeper expires the home part about 1 s later
        if await held(client, APPLE) == 0:
            break
        await asyncio.sleep(0.1)
    assert await held(client, APPLE) == 0

    retried = await client.post(RESERVATIONS, json=body, headers=key("crash-5"))

    assert retried.status_code < 500, retried.text
    assert (await held(client, APPLE), await held(client, PEAR)) == (0, 0)


# -- PUT /v1/skus/{sku} ---------------------------------------------------------------------------------


async def test_sku_put_replays_201_and_changes_nothing(client: httpx.AsyncClient, redis: Redis) -> None:
    body = {"on_hand": 5, "per_user_limit": 2}
    first = await client.put(f"/v1/skus/{APPLE}", json=body, headers=key("catalogue-1"))
    assert first.status_code == 201, first.text
    # someone changes the SKU without a key
    updated = await client.put(f"/v1/skus/{APPLE}", json={"on_hand": 7})
    assert updated.status_code == 200
    before = await snapshot(redis)

    again = await client.put(f"/v1/skus/{APPLE}", json=body, headers=key("catalogue-1"))

    assert_same_answer(first, again)  # 201 with on_hand 5: the first answer, not a new update
    assert again.json()["on_hand"] == 5
    assert await snapshot(redis) == before
    state = await sku_state(client, APPLE)
    assert (state["on_hand"], state["per_user_limit"]) == (7, None)


async def test_sku_put_update_replays_200(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, APPLE, on_hand=5)
    first = await client.put(f"/v1/skus/{APPLE}", json={"on_hand": 9}, headers=key("catalogue-2"))
    assert first.status_code == 200, first.text
    before = await snapshot(redis)
    assert_same_answer(first, await client.put(f"/v1/skus/{APPLE}", json={"on_hand": 9}, headers=key("catalogue-2")))
    assert await snapshot(redis) == before


async def test_sku_put_key_reused_with_another_body_is_refused(client: httpx.AsyncClient, redis: Redis) -> None:
    first = await client.put(f"/v1/skus/{APPLE}", json={"on_hand": 5}, headers=key("catalogue-3"))
    assert first.status_code == 201
    before = await snapshot(redis)

    refused = await client.put(f"/v1/skus/{APPLE}", json={"on_hand": 6}, headers=key("catalogue-3"))

    assert_problem(refused, 422, "idempotency_conflict")
    assert await snapshot(redis) == before
    assert (await sku_state(client, APPLE))["on_hand"] == 5


async def test_sku_put_key_is_scoped_to_its_path(client: httpx.AsyncClient) -> None:
    first = await client.put(f"/v1/skus/{APPLE}", json={"on_hand": 5}, headers=key("catalogue-4"))
    other = await client.put(f"/v1/skus/{PEAR}", json={"on_hand": 5}, headers=key("catalogue-4"))
    assert (first.status_code, other.status_code) == (201, 201)
    assert (await sku_state(client, PEAR))["on_hand"] == 5


# -- POST /v1/skus/{sku}/adjustments ----------------------------------------------------------------------


async def test_adjustment_replay_changes_on_hand_once(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, APPLE, on_hand=10)
    body = {"delta": 5, "reason": "truck 42"}
    first = await client.post(f"/v1/skus/{APPLE}/adjustments", json=body, headers=key("truck-42"))
    assert first.status_code == 200, first.text
    assert first.json()["on_hand"] == 15
    before = await snapshot(redis)

    again = await client.post(f"/v1/skus/{APPLE}/adjustments", json=body, headers=key("truck-42"))

    assert_same_answer(first, again)
    assert await snapshot(redis) == before
    assert (await sku_state(client, APPLE))["on_hand"] == 15


@pytest.mark.parametrize(
    "changed", [{"delta": 6, "reason": "truck 42"}, {"delta": 5, "reason": "truck 43"}], ids=["delta", "reason"]
)
async def test_adjustment_key_reused_with_another_body_is_refused(
    client: httpx.AsyncClient, redis: Redis, changed: dict[str, Any]
) -> None:
    await put_sku(client, APPLE, on_hand=10)
    first = await client.post(
        f"/v1/skus/{APPLE}/adjustments", json={"delta": 5, "reason": "truck 42"}, headers=key("truck-42")
    )
    assert first.status_code == 200
    before = await snapshot(redis)

    refused = await client.post(f"/v1/skus/{APPLE}/adjustments", json=changed, headers=key("truck-42"))

    assert_problem(refused, 422, "idempotency_conflict")
    assert await snapshot(redis) == before


async def test_adjustment_keys_are_scoped_per_sku(client: httpx.AsyncClient) -> None:
    await put_sku(client, APPLE, on_hand=10)
    await put_sku(client, PEAR, on_hand=10)
    body = {"delta": 5, "reason": "truck 42"}
    apple = await client.post(f"/v1/skus/{APPLE}/adjustments", json=body, headers=key("truck-42"))
    pear = await client.post(f"/v1/skus/{PEAR}/adjustments", json=body, headers=key("truck-42"))
    assert (apple.status_code, pear.status_code) == (200, 200)
    assert (await sku_state(client, APPLE))["on_hand"] == 15
    assert (await sku_state(client, PEAR))["on_hand"] == 15
    # nor is another method on the same SKU (PUT /v1/skus/apple) with the same key and another body
    put_same_key = await client.put(f"/v1/skus/{APPLE}", json={"on_hand": 20}, headers=key("truck-42"))
    assert put_same_key.status_code == 200, put_same_key.text
    assert (await sku_state(client, APPLE))["on_hand"] == 20


async def test_refused_shrink_is_replayed_as_refused(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, APPLE, on_hand=10)
    assert (await reserve(client, "bob", (APPLE, 8))).status_code == 201
    shrink = {"delta": -5, "reason": "breakage"}
    first = await client.post(f"/v1/skus/{APPLE}/adjustments", json=shrink, headers=key("shrink-1"))
    assert_problem(first, 409, "stock_conflict")
    assert (
        await client.post(f"/v1/skus/{APPLE}/adjustments", json={"delta": 10, "reason": "truck"})
    ).status_code == 200
    before = await snapshot(redis)

    again = await client.post(f"/v1/skus/{APPLE}/adjustments", json=shrink, headers=key("shrink-1"))

    assert_same_answer(first, again)
    assert await snapshot(redis) == before
    assert (await sku_state(client, APPLE))["on_hand"] == 20


# -- confirm and release ----------------------------------------------------------------------------------


async def test_confirm_replay_returns_the_first_answer(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, APPLE, on_hand=10)
    rid = (await reserve(client, "alice", (APPLE, 2))).json()["id"]
    first = await client.post(f"/v1/reservations/{rid}/confirm", headers=key("pay-1"))
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "confirmed"
    before = await snapshot(redis)

    again = await client.post(f"/v1/reservations/{rid}/confirm", headers=key("pay-1"))

    assert_same_answer(first, again)
    assert await snapshot(redis) == before
    state = await sku_state(client, APPLE)
    assert (state["held"], state["sold"]) == (0, 2)


async def test_replayed_confirm_refusal_stays_409_after_restock(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, APPLE, on_hand=1, mode="on_payment")
    first_buyer = (await reserve(client, "bob", (APPLE, 1))).json()["id"]
    late_buyer = (await reserve(client, "alice", (APPLE, 1))).json()["id"]
    assert (await client.post(f"/v1/reservations/{first_buyer}/confirm")).status_code == 200

    first = await client.post(f"/v1/reservations/{late_buyer}/confirm", headers=key("pay-2"))
    assert_problem(first, 409, "insufficient_stock")
    assert (
        await client.post(f"/v1/skus/{APPLE}/adjustments", json={"delta": 1, "reason": "found one"})
    ).status_code == 200
    before = await snapshot(redis)

    again = await client.post(f"/v1/reservations/{late_buyer}/confirm", headers=key("pay-2"))

    assert_same_answer(first, again)
    assert await snapshot(redis) == before
    # the stock is there: confirming without the key now succeeds
    confirmed = await client.post(f"/v1/reservations/{late_buyer}/confirm")
    assert confirmed.status_code == 200, confirmed.text
    assert (await sku_state(client, APPLE))["sold"] == 2


async def test_release_replay_returns_the_first_answer(client: httpx.AsyncClient, redis: Redis) -> None:
    await put_sku(client, APPLE, on_hand=10)
    rid = (await reserve(client, "alice", (APPLE, 2))).json()["id"]
    first = await client.post(f"/v1/reservations/{rid}/release", headers=key("cancel-1"))
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "released"
    before = await snapshot(redis)

    again = await client.post(f"/v1/reservations/{rid}/release", headers=key("cancel-1"))

    assert_same_answer(first, again)
    assert await snapshot(redis) == before
    assert await held(client, APPLE) == 0


@pytest.mark.parametrize("action", ["confirm", "release"])
async def test_confirm_and_release_replay_a_stored_404_rather_than_rerunning(
    app: FastAPI, client: httpx.AsyncClient, action: str
) -> None:
    """Proves the answer is replayed, not recomputed: the reservation appears after the first answer."""
    await put_sku(client, APPLE, on_hand=10)
    rid = new_reservation_id(KEYS.shard_of(TENANT, APPLE))
    first = await client.post(f"/v1/reservations/{rid}/{action}", headers=key("late-1"))
    assert_problem(first, 404, "reservation_not_found")
    await app.state.service.reserve(TENANT, ReservationRequest.model_validate(order("alice", (APPLE, 2))), rid)

    again = await client.post(f"/v1/reservations/{rid}/{action}", headers=key("late-1"))

    assert_same_answer(first, again)
    assert await held(client, APPLE) == 2
    without_key = await client.post(f"/v1/reservations/{rid}/{action}")
    assert without_key.status_code == 200, without_key.text


async def test_confirm_and_release_keys_are_scoped_per_reservation_and_action(client: httpx.AsyncClient) -> None:
    await put_sku(client, APPLE, on_hand=10)
    one = (await reserve(client, "alice", (APPLE, 1))).json()["id"]
    two = (await reserve(client, "bob", (APPLE, 2))).json()["id"]
    three = (await reserve(client, "carol", (APPLE, 3))).json()["id"]

    confirmed_one = await client.post(f"/v1/reservations/{one}/confirm", headers=key("same-key"))
    confirmed_two = await client.post(f"/v1/reservations/{two}/confirm", headers=key("same-key"))
    released_three = await client.post(f"/v1/reservations/{three}/release", headers=key("same-key"))
    # the same key on release of a confirmed reservation runs the release (and is refused by it)
    release_one = await client.post(f"/v1/reservations/{one}/release", headers=key("same-key"))

    assert (confirmed_one.json()["id"], confirmed_two.json()["id"]) == (one, two)
    assert (confirmed_one.json()["status"], confirmed_two.json()["status"]) == ("confirmed", "confirmed")
    assert released_three.json()["status"] == "released"
    assert_problem(release_one, 409, "reservation_confirmed")
    state = await sku_state(client, APPLE)
    assert (state["held"], state["sold"]) == (0, 3)


async def test_same_key_on_reservation_and_catalogue_paths_is_independent(client: httpx.AsyncClient) -> None:
    created = await client.put(f"/v1/skus/{APPLE}", json={"on_hand": 10}, headers=key("shared"))
    adjusted = await client.post(
        f"/v1/skus/{APPLE}/adjustments", json={"delta": 1, "reason": "x"}, headers=key("shared")
    )
    reserved = await client.post(RESERVATIONS, json=order("alice", (APPLE, 2)), headers=key("shared"))
    assert (created.status_code, adjusted.status_code, reserved.status_code) == (201, 200, 201)
    state = await sku_state(client, APPLE)
    assert (state["on_hand"], state["held"]) == (11, 2)
