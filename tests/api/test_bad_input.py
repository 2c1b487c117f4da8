"""Invariant 8: bad input changes nothing.

Every malformed or out-of-range request gets a 4xx RFC 9457 problem document with a stable ``code`` and
leaves the whole Redis keyspace (counters, holds, per-user counts, expiry indexes, event streams,
idempotency records) exactly as it was. Each case runs against a catalogue with live holds and sales, so
a refused request has something it could wrongly change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from tests.helpers import put_sku, reserve, sku_state, snapshot

TENANT = "default"
KEYS = KeySpace(16)

# apple and kiwi share a shard, pear lives on another: multi-item cases cover one script call and two.
APPLE, KIWI, PEAR = "apple", "kiwi", "pear"
UNKNOWN_SKU = "ghost-1"  # on neither apple's nor pear's shard
GHOST_SAME_SHARD = "ghost-35"  # unknown, on apple's (and kiwi's) shard
UNKNOWN_RID = "rsv_3_aaaaaaaaaaaaaaaa"  # well-formed (shard 3 exists), never issued
PROBLEM_KEYS = {"type", "title", "status", "detail", "code"}
MAX_BODY = 65_536
JSON_HEADERS = {"content-type": "application/json"}


def test_sku_shards_are_what_the_cases_assume() -> None:
    assert KEYS.shard_of(TENANT, APPLE) == KEYS.shard_of(TENANT, KIWI)
    assert KEYS.shard_of(TENANT, APPLE) != KEYS.shard_of(TENANT, PEAR)
    assert KEYS.shard_of(TENANT, UNKNOWN_SKU) not in (KEYS.shard_of(TENANT, APPLE), KEYS.shard_of(TENANT, PEAR))
    assert KEYS.shard_of(TENANT, GHOST_SAME_SHARD) == KEYS.shard_of(TENANT, APPLE)


async def stock_with_live_holds(client: httpx.AsyncClient) -> str:
    """apple: on_hand 10, held 2, sold 1; pear: held 1; kiwi untouched. Returns the live reservation id."""
    await put_sku(client, APPLE, on_hand=10, per_user_limit=5)
    await put_sku(client, KIWI, on_hand=5)
    await put_sku(client, PEAR, on_hand=5, mode="on_order")
    live = await reserve(client, "alice", (APPLE, 2), (PEAR, 1))
    assert live.status_code == 201, live.text
    paid = await reserve(client, "bob", (APPLE, 1))
    assert paid.status_code == 201, paid.text
    assert (await client.post(f"/v1/reservations/{paid.json()['id']}/confirm")).status_code == 200
    apple = await sku_state(client, APPLE)
    assert (apple["on_hand"], apple["held"], apple["sold"]) == (10, 2, 1)
    return str(live.json()["id"])


def assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem.keys() >= PROBLEM_KEYS, problem
    assert problem["status"] == status
    assert problem["code"] == code
    for key in ("type", "title", "detail"):
        assert isinstance(problem[key], str) and problem[key], problem


# -- request builders: each bad case is a valid base request with exactly one thing wrong ----------------

BASE_RESERVATION: dict[str, Any] = {"user_id": "mallory", "items": [{"sku": APPLE, "quantity": 1}]}
BASE_SKU: dict[str, Any] = {"on_hand": 10, "safety_stock": 0, "mode": "pre_reserve", "hold_ttl_seconds": 900}
BASE_ADJUSTMENT: dict[str, Any] = {"delta": 5, "reason": "restock"}


def reservation(**changes: Any) -> dict[str, Any]:
    return {**BASE_RESERVATION, **changes}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def quantity(value: Any) -> dict[str, Any]:
    return reservation(items=[{"sku": APPLE, "quantity": value}])


def sku_body(**changes: Any) -> dict[str, Any]:
    return {**BASE_SKU, **changes}


def adjustment(**changes: Any) -> dict[str, Any]:
    return {**BASE_ADJUSTMENT, **changes}


async def _oversized_chunks() -> AsyncIterator[bytes]:
    # No content-length: the guard must count streamed bytes, not trust a header.
    for _ in range(5):
        yield b" " * 16_384


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    url: str  # "{rid}" is replaced by the live reservation's id
    status: int
    code: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def post_reservation(name: str, body: Any, status: int = 422, code: str = "validation_error") -> Case:
    return Case(name, "POST", "/v1/reservations", status, code, {"json": body})


def put_apple(name: str, body: Any, status: int = 422, code: str = "validation_error") -> Case:
    return Case(name, "PUT", f"/v1/skus/{APPLE}", status, code, {"json": body})


def adjust_apple(name: str, body: Any, status: int = 422, code: str = "validation_error") -> Case:
    return Case(name, "POST", f"/v1/skus/{APPLE}/adjustments", status, code, {"json": body})


CASES = [
    # quantities
    post_reservation("quantity-negative", quantity(-1)),
    post_reservation("quantity-zero", quantity(0)),
    post_reservation("quantity-1001", quantity(1001)),
    post_reservation("quantity-10**12", quantity(10**12)),
    post_reservation("quantity-float", quantity(2.5)),
    post_reservation("quantity-integral-float", quantity(2.0)),
    post_reservation("quantity-string", quantity("2")),
    post_reservation("quantity-true", quantity(True)),
    post_reservation("quantity-null", quantity(None)),
    post_reservation("quantity-missing", reservation(items=[{"sku": APPLE}])),
    # items
    post_reservation("duplicated-sku", reservation(items=[{"sku": APPLE, "quantity": 1}] * 2)),
    post_reservation(
        "duplicated-sku-not-adjacent",
        reservation(items=[{"sku": APPLE, "quantity": 1}, {"sku": PEAR, "quantity": 1}, {"sku": APPLE, "quantity": 2}]),
    ),
    post_reservation("51-items", reservation(items=[{"sku": f"item-{i}", "quantity": 1} for i in range(51)])),
    post_reservation("no-items", reservation(items=[])),
    post_reservation("items-object", reservation(items={"sku": APPLE, "quantity": 1})),
    post_reservation("items-string", reservation(items=APPLE)),
    post_reservation("items-missing", without(BASE_RESERVATION, "items")),
    post_reservation("item-sku-malformed", reservation(items=[{"sku": "bad sku", "quantity": 1}])),
    post_reservation("item-sku-65-chars", reservation(items=[{"sku": "a" * 65, "quantity": 1}])),
    post_reservation("item-unknown-field", reservation(items=[{"sku": APPLE, "quantity": 1, "price": 9}])),
    # user and envelope
    post_reservation("user-id-empty", reservation(user_id="")),
    post_reservation("user-id-10kB", reservation(user_id="u" * 10_240)),
    post_reservation("user-id-control-char", reservation(user_id="mal\nlory")),
    post_reservation("user-id-number", reservation(user_id=42)),
    post_reservation("user-id-missing", without(BASE_RESERVATION, "user_id")),
    post_reservation("channel-malformed", reservation(channel="web shop")),
    post_reservation("unknown-field", reservation(coupon="FREE")),
    post_reservation("body-array", [BASE_RESERVATION]),
    post_reservation("body-empty", None),  # httpx sends no body at all for json=None
    Case(
        "body-null", "POST", "/v1/reservations", 422, "validation_error", {"content": b"null", "headers": JSON_HEADERS}
    ),
    # unknown SKUs: all-or-nothing, nothing held for the known lines
    post_reservation("unknown-sku", reservation(items=[{"sku": UNKNOWN_SKU, "quantity": 1}]), 404, "sku_not_found"),
    post_reservation(
        "unknown-sku-2nd-item-other-shard",
        reservation(items=[{"sku": APPLE, "quantity": 1}, {"sku": UNKNOWN_SKU, "quantity": 1}]),
        404,
        "sku_not_found",
    ),
    post_reservation(
        "unknown-sku-2nd-item-same-shard",
        # one script call must refuse the whole part
        reservation(items=[{"sku": APPLE, "quantity": 1}, {"sku": GHOST_SAME_SHARD, "quantity": 1}]),
        404,
        "sku_not_found",
    ),
    # bodies the JSON layer refuses
    Case(
        "invalid-json",
        "POST",
        "/v1/reservations",
        400,
        "malformed_json",
        {"content": b'{"user_id":', "headers": JSON_HEADERS},
    ),
    Case(
        "json-trailing-garbage",
        "POST",
        "/v1/reservations",
        400,
        "malformed_json",
        {"content": b'{"user_id": "m", "items": []} x', "headers": JSON_HEADERS},
    ),
    Case(
        "json-not-utf8",
        "POST",
        "/v1/reservations",
        400,
        "malformed_json",
        {"content": b'{"user_id": "\xff\xfe", "items": []}', "headers": JSON_HEADERS},
    ),
    Case(
        "content-type-text",
        "POST",
        "/v1/reservations",
        415,
        "unsupported_media_type",
        {"content": b'{"user_id": "m"}', "headers": {"content-type": "text/plain"}},
    ),
    Case(
        "content-type-form",
        "POST",
        "/v1/reservations",
        415,
        "unsupported_media_type",
        {"data": {"user_id": "mallory"}},
    ),
    Case("content-type-missing", "POST", "/v1/reservations", 415, "unsupported_media_type", {"content": b"{}"}),
    Case(
        "content-type-text-on-put",
        "PUT",
        f"/v1/skus/{APPLE}",
        415,
        "unsupported_media_type",
        {"content": b'{"on_hand": 0}', "headers": {"content-type": "text/plain"}},
    ),
    Case(
        "body-over-64KiB",
        "POST",
        "/v1/reservations",
        413,
        "payload_too_large",
        {"content": b" " * (MAX_BODY + 1), "headers": JSON_HEADERS},
    ),
    Case(
        "body-over-64KiB-on-put",
        "PUT",
        f"/v1/skus/{APPLE}",
        413,
        "payload_too_large",
        {"content": b'{"on_hand": 0}' + b" " * MAX_BODY, "headers": JSON_HEADERS},
    ),
    Case(
        "body-over-64KiB-chunked",
        "POST",
        "/v1/reservations",
        413,
        "payload_too_large",
        {"content": "chunked", "headers": JSON_HEADERS},
    ),
    # Idempotency-Key header
    Case(
        "idempotency-key-300-chars",
        "POST",
        "/v1/reservations",
        422,
        "validation_error",
        {"json": BASE_RESERVATION, "headers": {"Idempotency-Key": "k" * 300}},
    ),
    Case(
        "idempotency-key-empty",
        "POST",
        "/v1/reservations",
        422,
        "validation_error",
        {"json": BASE_RESERVATION, "headers": {"Idempotency-Key": ""}},
    ),
    Case(
        "idempotency-key-non-ascii",
        "POST",
        "/v1/reservations",
        422,
        "validation_error",
        {"json": BASE_RESERVATION, "headers": {"Idempotency-Key": "clé".encode()}},
    ),
    Case(
        "idempotency-key-300-chars-on-confirm",
        "POST",
        "/v1/reservations/{rid}/confirm",
        422,
        "validation_error",
        {"headers": {"Idempotency-Key": "k" * 300}},
    ),
    Case(
        "idempotency-key-300-chars-on-release",
        "POST",
        "/v1/reservations/{rid}/release",
        422,
        "validation_error",
        {"headers": {"Idempotency-Key": "k" * 300}},
    ),
    Case(
        "idempotency-key-300-chars-on-adjustment",
        "POST",
        f"/v1/skus/{APPLE}/adjustments",
        422,
        "validation_error",
        {"json": BASE_ADJUSTMENT, "headers": {"Idempotency-Key": "k" * 300}},
    ),
    # reservation ids
    Case("get-unknown-reservation", "GET", f"/v1/reservations/{UNKNOWN_RID}", 404, "reservation_not_found"),
    Case(
        "confirm-unknown-reservation", "POST", f"/v1/reservations/{UNKNOWN_RID}/confirm", 404, "reservation_not_found"
    ),
    Case(
        "release-unknown-reservation", "POST", f"/v1/reservations/{UNKNOWN_RID}/release", 404, "reservation_not_found"
    ),
    Case(
        "confirm-reservation-on-missing-shard",
        "POST",
        "/v1/reservations/rsv_99_aaaaaaaaaaaaaaaa/confirm",
        404,
        "reservation_not_found",
    ),
    Case("get-malformed-reservation-id", "GET", "/v1/reservations/rsv_nope", 422, "validation_error"),
    Case("confirm-malformed-reservation-id", "POST", "/v1/reservations/rsv_3_AAAA/confirm", 422, "validation_error"),
    Case(
        "release-malformed-reservation-id",
        "POST",
        "/v1/reservations/rsv_3_aaaaaaaaaaaaaaaa1/release",
        422,
        "validation_error",
    ),
    # SKU settings (PUT)
    put_apple("on-hand-negative", sku_body(on_hand=-1)),
    put_apple("on-hand-string", sku_body(on_hand="10")),
    put_apple("on-hand-float", sku_body(on_hand=10.5)),
    put_apple("on-hand-over-max", sku_body(on_hand=10**9 + 1)),
    put_apple("on-hand-missing", without(BASE_SKU, "on_hand")),
    put_apple("safety-stock-negative", sku_body(safety_stock=-1)),
    put_apple("mode-invalid", sku_body(mode="reserve_later")),
    put_apple("mode-not-a-string", sku_body(mode=1)),
    put_apple("hold-ttl-0", sku_body(hold_ttl_seconds=0)),
    put_apple("hold-ttl-86401", sku_body(hold_ttl_seconds=86_401)),
    put_apple("per-user-limit-0", sku_body(per_user_limit=0)),
    put_apple("unknown-field-typo", sku_body(safety_stok=5)),
    put_apple("on-hand-below-held-plus-sold", sku_body(on_hand=2), 409, "stock_conflict"),
    put_apple("on-hand-zero-with-holds", sku_body(on_hand=0), 409, "stock_conflict"),
    put_apple("safety-stock-eats-held-plus-sold", sku_body(safety_stock=8), 409, "stock_conflict"),
    Case("put-sku-with-space", "PUT", "/v1/skus/bad%20sku", 422, "validation_error", {"json": BASE_SKU}),
    Case("put-sku-65-chars", "PUT", f"/v1/skus/{'s' * 65}", 422, "validation_error", {"json": BASE_SKU}),
    Case("put-sku-leading-dash", "PUT", "/v1/skus/-apple", 422, "validation_error", {"json": BASE_SKU}),
    # adjustments
    adjust_apple("delta-zero", adjustment(delta=0)),
    adjust_apple("delta-float", adjustment(delta=1.5)),
    adjust_apple("delta-string", adjustment(delta="5")),
    adjust_apple("reason-empty", adjustment(reason="")),
    adjust_apple("reason-missing", without(BASE_ADJUSTMENT, "reason")),
    adjust_apple("adjustment-unknown-field", adjustment(sku=PEAR)),
    adjust_apple("shrink-below-held-plus-sold", adjustment(delta=-8), 409, "stock_conflict"),
    Case(
        "adjust-unknown-sku",
        "POST",
        f"/v1/skus/{UNKNOWN_SKU}/adjustments",
        404,
        "sku_not_found",
        {"json": BASE_ADJUSTMENT},
    ),
    Case(
        "adjust-sku-with-space",
        "POST",
        "/v1/skus/bad%20sku/adjustments",
        422,
        "validation_error",
        {"json": BASE_ADJUSTMENT},
    ),
    # reads and routing
    Case("get-unknown-sku", "GET", f"/v1/skus/{UNKNOWN_SKU}", 404, "sku_not_found"),
    Case("get-sku-65-chars", "GET", f"/v1/skus/{'s' * 65}", 422, "validation_error"),
    Case("delete-sku", "DELETE", f"/v1/skus/{APPLE}", 405, "method_not_allowed"),
    Case("unknown-route", "POST", "/v1/skus", 404, "not_found", {"json": BASE_SKU}),
]


def test_cases_are_distinct_and_many() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))
    assert len(names) >= 20


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_bad_request_is_refused_and_changes_nothing(client: httpx.AsyncClient, redis: Redis, case: Case) -> None:
    rid = await stock_with_live_holds(client)
    kwargs = dict(case.kwargs)
    if kwargs.get("content") == "chunked":
        kwargs["content"] = _oversized_chunks()
    before = await snapshot(redis)

    response = await client.request(case.method, case.url.format(rid=rid), **kwargs)

    assert_problem(response, case.status, case.code)
    assert await snapshot(redis) == before


async def test_unknown_second_item_holds_nothing_for_the_first(client: httpx.AsyncClient) -> None:
    await stock_with_live_holds(client)
    for second in (UNKNOWN_SKU, GHOST_SAME_SHARD):
        refused = await reserve(client, "mallory", (KIWI, 1), (second, 1))
        assert_problem(refused, 404, "sku_not_found")
        assert refused.json()["detail"].count(second) == 1
        assert (await sku_state(client, KIWI))["held"] == 0
    # and the same request without the unknown line goes through: the refusal was about that line
    accepted = await reserve(client, "mallory", (KIWI, 1))
    assert accepted.status_code == 201
    assert (await sku_state(client, KIWI))["held"] == 1


async def test_the_base_requests_are_valid(client: httpx.AsyncClient) -> None:
    """Each bad case differs from one of these in one place; these must be accepted."""
    rid = await stock_with_live_holds(client)
    reserved = await client.post("/v1/reservations", json=BASE_RESERVATION)
    assert reserved.status_code == 201, reserved.text
    adjusted = await client.post(f"/v1/skus/{APPLE}/adjustments", json=BASE_ADJUSTMENT)
    assert adjusted.status_code == 200, adjusted.text
    assert adjusted.json()["on_hand"] == 15
    updated = await client.put(f"/v1/skus/{APPLE}", json=BASE_SKU)
    assert updated.status_code == 200, updated.text
    assert (await client.get(f"/v1/reservations/{rid}")).status_code == 200
    assert (await client.post(f"/v1/reservations/{rid}/confirm")).status_code == 200


async def test_stock_conflict_boundaries_are_accepted(client: httpx.AsyncClient) -> None:
    """held + sold == on_hand - safety_stock is allowed; the 409 cases above are one unit past it."""
    await stock_with_live_holds(client)  # apple: held 2 + sold 1
    put = await client.put(f"/v1/skus/{APPLE}", json=sku_body(on_hand=10, safety_stock=7))
    assert put.status_code == 200, put.text
    assert put.json()["available"] == 0
    shrink = await client.post(f"/v1/skus/{APPLE}/adjustments", json=adjustment(delta=-1, reason="breakage"))
    assert_problem(shrink, 409, "stock_conflict")
    await put_sku(client, APPLE, on_hand=10)
    shrink = await client.post(f"/v1/skus/{APPLE}/adjustments", json=adjustment(delta=-7, reason="breakage"))
    assert shrink.status_code == 200, shrink.text
    assert (shrink.json()["on_hand"], shrink.json()["available"]) == (3, 0)


async def test_body_of_exactly_64KiB_is_accepted(client: httpx.AsyncClient) -> None:
    await stock_with_live_holds(client)
    body = b'{"user_id": "mallory", "items": [{"sku": "apple", "quantity": 1}]}'
    padded = body + b" " * (MAX_BODY - len(body))
    assert len(padded) == MAX_BODY
    response = await client.post("/v1/reservations", content=padded, headers=JSON_HEADERS)
    assert response.status_code == 201, response.text


async def test_bad_input_with_an_idempotency_key_does_not_burn_the_key(client: httpx.AsyncClient, redis: Redis) -> None:
    await stock_with_live_holds(client)
    headers = {"Idempotency-Key": "order-77"}
    before = await snapshot(redis)
    refused = await client.post("/v1/reservations", json=quantity(0), headers=headers)
    assert_problem(refused, 422, "validation_error")
    assert await snapshot(redis) == before
    accepted = await client.post("/v1/reservations", json=quantity(1), headers=headers)
    assert accepted.status_code == 201, accepted.text
