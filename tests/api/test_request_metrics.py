"""The service's own metrics on GET /metrics (app/telemetry/metrics.py, app/api/observe.py): reservations
by outcome, request latency per route template, the expiry sweeper, the sold-out fast path; and the
X-Request-ID every answer carries. Against the real app (lifespan, Redis, PostgreSQL), in one process:
the metrics are then in-memory, private to the app (multiprocess aggregation: test_metrics_processes.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.main import create_app
from app.telemetry.metrics import LATENCY_BUCKETS
from tests.helpers import put_sku, reserve

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """(sample name, labels) -> value, for every sample of the page."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(page: Samples, name: str, **labels: str) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return samples(response.text)


def outcomes(page: Samples) -> dict[str, float]:
    return {
        dict(labels)["outcome"]: v for (name, labels), v in page.items() if name == "stockhold_reservations_total" and v
    }


@asynccontextmanager
async def client_with(
    settings: Settings, raise_errors: bool = True, **changes: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update=changes))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_errors)
        async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


async def test_every_reservation_outcome_moves_its_counter(client: httpx.AsyncClient) -> None:
    # given SKUs set up for each refusal
    await put_sku(client, "one-left", on_hand=1)
    await put_sku(client, "limited", on_hand=10, per_user_limit=1)
    await put_sku(client, "aged-only", on_hand=10, eligibility={"min_account_age_days": 30})
    await put_sku(client, "plenty", on_hand=100)
    assert outcomes(await scrape(client)) == {}

    # when one reservation of each outcome is made
    assert (await reserve(client, "ann", ("one-left", 1))).status_code == 201
    assert (await reserve(client, "ben", ("one-left", 1))).status_code == 409  # Redis refuses, the process learns
    fast = await reserve(client, "cy", ("one-left", 1))  # refused from memory
    assert fast.status_code == 409 and fast.json()["code"] == "insufficient_stock"
    assert (await reserve(client, "dee", ("limited", 1))).status_code == 201
    assert (await reserve(client, "dee", ("limited", 1))).json()["code"] == "limit_exceeded"
    assert (await reserve(client, "eve", ("aged-only", 1))).json()["code"] == "not_eligible"
    assert (await reserve(client, "fay", ("no-such-sku", 1))).json()["code"] == "sku_not_found"
    assert (await reserve(client, "gus", ("plenty", 0))).json()["code"] == "validation_error"
    malformed = await client.post("/v1/reservations", content=b"{", headers={"content-type": "application/json"})
    assert malformed.json()["code"] == "malformed_json"
    body = {"user_id": "hal", "items": [{"sku": "plenty", "quantity": 1}]}
    key = {"Idempotency-Key": "metrics-k1"}
    assert (await client.post("/v1/reservations", json=body, headers=key)).status_code == 201
    assert (await client.post("/v1/reservations", json=body, headers=key)).status_code == 201  # replayed
    other = {**body, "user_id": "ivy"}
    assert (await client.post("/v1/reservations", json=other, headers=key)).json()["code"] == "idempotency_conflict"

    # then each outcome was counted once, the replay and the fast path under their own names
    page = await scrape(client)
    assert outcomes(page) == {
        "reserved": 3,
        "insufficient_stock": 1,
        "sold_out_fast_path": 1,
        "limit_exceeded": 1,
        "not_eligible": 1,
        "sku_not_found": 1,
        "validation_error": 1,
        "malformed_json": 1,
        "idempotent_replay": 1,
        "idempotency_conflict": 1,
    }
    assert value(page, "stockhold_sold_out_fast_path_hits_total") == 1


async def test_rate_limits_refused_keys_and_unexpected_errors_are_counted(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with client_with(settings, raise_errors=False, user_rate_per_second=0.001, user_burst=1) as client:
        await put_sku(client, "gpu", on_hand=100)
        assert (await reserve(client, "bot", ("gpu", 1))).status_code == 201
        assert (await reserve(client, "bot", ("gpu", 1))).json()["code"] == "rate_limited"

        async def broken(*_: object, **__: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(client.app.state.service, "reserve", broken)  # type: ignore[attr-defined]
        assert (await reserve(client, "carl", ("gpu", 1))).status_code == 500

        page = await scrape(client)
    assert outcomes(page) == {"reserved": 1, "rate_limited": 1, "error": 1}
    assert (
        value(page, "stockhold_request_duration_seconds_count", method="POST", route="/v1/reservations", status="5xx")
        == 1
    )

    async with client_with(settings, require_auth=True) as strict:
        assert (await reserve(strict, "ann", ("gpu", 1))).json()["code"] == "unauthenticated"
        assert outcomes(await scrape(strict)) == {"unauthenticated": 1}


async def test_the_latency_histogram_counts_requests_per_route_template(client: httpx.AsyncClient) -> None:
    await put_sku(client, "tea", on_hand=10)
    for _ in range(3):
        assert (await client.get("/v1/skus/tea")).status_code == 200
    assert (await client.get("/v1/skus/nope")).status_code == 404
    made = await reserve(client, "ann", ("tea", 1))
    rid = made.json()["id"]
    assert (await client.post(f"/v1/reservations/{rid}/confirm")).status_code == 200
    assert (await client.get("/no/such/path")).status_code == 404

    page = await scrape(client)

    def count(method: str, route: str, status: str) -> float:
        return value(page, "stockhold_request_duration_seconds_count", method=method, route=route, status=status)

    assert count("GET", "/v1/skus/{sku}", "2xx") == 3
    assert count("GET", "/v1/skus/{sku}", "4xx") == 1
    assert count("PUT", "/v1/skus/{sku}", "2xx") == 1
    assert count("POST", "/v1/reservations", "2xx") == 1
    assert count("POST", "/v1/reservations/{reservation_id}/confirm", "2xx") == 1
    assert count("GET", "/no/such/path", "4xx") == 0, "a raw path must never become a label"
    assert count("GET", "unmatched", "4xx") == 1
    # the buckets of one series: cumulative, every configured bound, +Inf equal to the count
    labels = {"method": "GET", "route": "/v1/skus/{sku}", "status": "2xx"}
    buckets = {
        dict(ls)["le"]: v
        for (name, ls), v in page.items()
        if name == "stockhold_request_duration_seconds_bucket" and {k: v for k, v in ls if k != "le"} == labels
    }
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    ordered = [buckets[le] for le in sorted(buckets, key=float)]
    assert ordered == sorted(ordered) and ordered[-1] == buckets["+Inf"] == 3
    assert 0 < value(page, "stockhold_request_duration_seconds_sum", **labels) < 3 * 10


async def test_the_sweeper_counts_its_runs_and_the_holds_it_expired(client: httpx.AsyncClient) -> None:
    # given two one-second holds (the app's sweeper runs every 100 ms in the tests)
    await put_sku(client, "brief", on_hand=5, hold_ttl_seconds=1)
    for user in ("ann", "ben"):
        assert (await reserve(client, user, ("brief", 1))).status_code == 201

    # when their deadline passes, the sweeper expires them and the counter says so
    deadline = time.monotonic() + 5
    while value(page := await scrape(client), "stockhold_expired_holds_total") < 2:
        assert time.monotonic() < deadline, "the holds were not counted as expired within 5 s"
        await asyncio.sleep(0.1)

    assert value(page, "stockhold_expired_holds_total") == 2
    runs = value(page, "stockhold_sweeper_runs_total", result="ok")
    assert runs >= 10  # a second at 100 ms a tick
    assert value(page, "stockhold_sweeper_runs_total", result="error") == 0
    timed = value(page, "stockhold_sweep_duration_seconds_count")
    assert runs <= timed <= runs + 1  # each run is timed (one may finish between the two reads)


async def test_every_answer_carries_a_request_id_its_own_when_well_formed(client: httpx.AsyncClient) -> None:
    generated = {(await client.get(path)).headers["x-request-id"] for path in ("/healthz", "/healthz", "/nowhere")}
    assert len(generated) == 3 and all(re.fullmatch(r"[0-9a-f]{24}", rid) for rid in generated), generated

    await put_sku(client, "tea", on_hand=5)
    body = {"user_id": "ann", "items": [{"sku": "tea", "quantity": 1}]}
    for sent in ("4bf92f35-77b3-4da6-a3ce-929d0e0e4736", "01J9ZQ", "req.7:a/b+c=", "z" * 128):
        headers = {"X-Request-ID": sent}
        assert (await client.get("/v1/skus/tea", headers=headers)).headers["x-request-id"] == sent
        assert (await client.post("/v1/reservations", json=body, headers=headers)).headers["x-request-id"] == sent


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Request-ID", "x" * 129)],  # too long
        [("X-Request-ID", "has space")],
        [("X-Request-ID", 'quo"te')],
        [("X-Request-ID", "")],
        [("X-Request-ID", "é".encode())],  # not ASCII
        [("X-Request-ID", "one"), ("X-Request-ID", "two")],  # which one would we believe?
    ],
)
async def test_a_malformed_incoming_request_id_is_replaced(
    client: httpx.AsyncClient, headers: list[tuple[str, str | bytes]]
) -> None:
    for path in ("/healthz", "/v1/reservations"):
        response = await client.request("GET" if path == "/healthz" else "POST", path, headers=headers, json={})
        assert re.fullmatch(r"[0-9a-f]{24}", response.headers["x-request-id"]), response.headers
        assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]
