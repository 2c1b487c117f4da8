"""Deliveries end to end, in process: real reservations expire on real Redis, the dispatcher records them
in PostgreSQL, the sender POSTs them to a receiver on 127.0.0.1 that verifies the signatures."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from tests.helpers import put_sku, reserve
from tests.webhooks.conftest import FAST
from tests.webhooks.receiver import Receiver, running


async def subscribe(client: httpx.AsyncClient, receiver: Receiver, path: str = "/hook", **body: Any) -> dict[str, Any]:
    created = await client.post(
        "/v1/webhooks", json={"url": receiver.url + path, "events": ["reservation_expired"], **body}
    )
    assert created.status_code == 201, created.text
    hook = dict(created.json())
    receiver.secrets[path] = hook["secret"]
    return hook


async def expire_one(client: httpx.AsyncClient, sku: str = "tea", user: str = "u1") -> str:
    """A reservation held for one second, left to expire (the sweeper does it): returns its id."""
    await put_sku(client, sku, on_hand=10, hold_ttl_seconds=1)
    held = await reserve(client, user, (sku, 1))
    assert held.status_code == 201, held.text
    return str(held.json()["id"])


async def deliveries(client: httpx.AsyncClient, hook: dict[str, Any], **params: Any) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/webhooks/{hook['id']}/deliveries", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["deliveries"])


async def until(predicate: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


async def test_signed_delivery_retried_after_500s_then_logged(wh_client: httpx.AsyncClient) -> None:
    async with running(Receiver(fail_first=2)) as receiver:
        hook = await subscribe(wh_client, receiver)
        reservation = await expire_one(wh_client)
        event_id = f"evt_{reservation}_reservation_expired"

        await receiver.wait_for(lambda: event_id in receiver.events, timeout_s=10)

        attempts = receiver.attempts_of(event_id)
        assert [r.status for r in attempts] == [500, 500, 200]
        assert all(r.verified for r in attempts)  # every attempt signed with the endpoint's secret
        assert {r.headers["webhook-id"] for r in attempts} == {event_id}
        assert all(r.headers["webhook-signature"].startswith("v1=") for r in attempts)
        body = receiver.events[event_id]
        assert body["id"] == event_id and body["type"] == "reservation_expired" and body["tenant"] == "default"
        assert body["data"] == {"reservation_id": reservation, "user_id": "u1"}
        gaps = [b.at - a.at for a, b in itertools.pairwise(attempts)]
        print(f"\nretry gaps after 500s: {', '.join(f'{g * 1000:.0f} ms' for g in gaps)} (base 50 ms, cap 200 ms)")
        assert all(g >= 0.025 for g in gaps)  # backoff: never sooner than half the first step

        async def logged() -> bool:
            found = await deliveries(wh_client, hook)
            return bool(found) and found[0]["status"] == "delivered"

        await until(logged)
        (delivery,) = await deliveries(wh_client, hook)
        assert delivery["event_id"] == event_id and delivery["event_type"] == "reservation_expired"
        assert delivery["attempts"] == 3 and delivery["next_attempt_at"] is None and delivery["delivered_at"]
        assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 500, 200]
        assert [a["error"] for a in delivery["attempt_log"]] == ["HTTP 500", "HTTP 500", None]
        assert [a["attempt"] for a in delivery["attempt_log"]] == [1, 2, 3]
        assert delivery["payload"] == body


async def test_a_lost_2xx_is_redelivered_and_the_receiver_dedupes_on_the_event_id(wh_client: httpx.AsyncClient) -> None:
    # the receiver processes the first attempt but answers after the sender's 1 s timeout
    async with running(Receiver(slow_first_s=1.5)) as receiver:
        hook = await subscribe(wh_client, receiver)
        reservation = await expire_one(wh_client)
        event_id = f"evt_{reservation}_reservation_expired"

        await receiver.wait_for(lambda: len(receiver.attempts_of(event_id)) >= 2, timeout_s=15)

        assert list(receiver.events) == [event_id]  # processed once
        assert receiver.duplicates == 1  # the retry was recognised by its Webhook-Id

        async def delivered() -> bool:
            return (await deliveries(wh_client, hook))[0]["status"] == "delivered"

        await until(delivered)
        log = (await deliveries(wh_client, hook))[0]["attempt_log"]
        assert log[0]["status_code"] is None and log[0]["error"].startswith("timeout after 1 s")
        assert log[1]["status_code"] == 200


async def test_a_receiver_that_keeps_failing_ends_failed_and_is_counted(
    wh_app: FastAPI, wh_client: httpx.AsyncClient
) -> None:
    async with running(Receiver(fail_first=1000)) as receiver:
        hook = await subscribe(wh_client, receiver)
        await expire_one(wh_client)

        async def failed() -> bool:
            found = await deliveries(wh_client, hook)
            return bool(found) and found[0]["status"] == "failed"

        await until(failed)
        (delivery,) = await deliveries(wh_client, hook)
        assert delivery["attempts"] == FAST["webhook_max_attempts"] == len(receiver.requests)
        assert [a["status_code"] for a in delivery["attempt_log"]] == [500] * 4
        await asyncio.sleep(0.3)
        assert len(receiver.requests) == 4  # no attempt after the last

    metrics = (await wh_client.get("/metrics")).text
    assert 'stockhold_webhook_deliveries_total{outcome="failed"} 1.0' in metrics
    assert 'stockhold_webhook_attempts_total{result="error"} 4.0' in metrics


async def test_an_unreachable_endpoint_is_logged_as_a_connection_error(wh_client: httpx.AsyncClient) -> None:
    async with running(Receiver()) as receiver:
        closed = receiver.url
    created = await wh_client.post("/v1/webhooks", json={"url": closed + "/x", "events": ["reservation_expired"]})
    hook = created.json()
    await expire_one(wh_client)

    async def tried() -> bool:
        found = await deliveries(wh_client, hook)
        return bool(found) and len(found[0]["attempt_log"]) >= 2

    await until(tried)
    attempt = (await deliveries(wh_client, hook))[0]["attempt_log"][0]
    assert attempt["status_code"] is None and attempt["error"].startswith("ConnectError")


async def test_only_subscribed_active_endpoints_of_the_tenant_get_deliveries(
    wh_client: httpx.AsyncClient, wh_pg: asyncpg.Pool
) -> None:
    async with running(Receiver()) as receiver:
        wanted = await subscribe(wh_client, receiver, "/wanted")
        await subscribe(wh_client, receiver, "/other-type", events=["sold_out"])
        paused = await subscribe(wh_client, receiver, "/paused")
        await wh_client.patch(f"/v1/webhooks/{paused['id']}", json={"active": False})
        reservation = await expire_one(wh_client)

        await receiver.wait_for(lambda: len(receiver.events) == 1, timeout_s=10)
        await asyncio.sleep(0.3)
        assert [r.path for r in receiver.requests] == ["/wanted"]
        assert await wh_pg.fetchval("SELECT count(*) FROM webhook_delivery") == 1
        assert (await deliveries(wh_client, wanted))[0]["event_id"] == f"evt_{reservation}_reservation_expired"


async def test_deliveries_are_listed_newest_first_within_the_limit(wh_client: httpx.AsyncClient) -> None:
    async with running(Receiver()) as receiver:
        hook = await subscribe(wh_client, receiver)
        ids = [await expire_one(wh_client, sku=f"sku-{i}", user=f"u{i}") for i in range(3)]
        await receiver.wait_for(lambda: len(receiver.events) == 3, timeout_s=10)

        listed = await deliveries(wh_client, hook)
        assert len(listed) == 3 and [d["id"] for d in listed] == sorted((d["id"] for d in listed), reverse=True)
        assert {d["payload"]["data"]["reservation_id"] for d in listed} == set(ids)
        assert len(await deliveries(wh_client, hook, limit=2)) == 2


async def test_delivery_latency_from_the_stream_to_the_receiver(
    wh_client: httpx.AsyncClient, wh_pg: asyncpg.Pool
) -> None:
    async with running(Receiver()) as receiver:
        await subscribe(wh_client, receiver)
        n = 20
        for i in range(n):
            await expire_one(wh_client, sku=f"l-{i}", user=f"u{i}")
        await receiver.wait_for(lambda: len(receiver.events) == n, timeout_s=15)

        # from the XADD of the expired event (its stream entry id is Redis's clock) to the POST's arrival
        xadd_ms = {r["id"]: int(r["stream_id"].split("-")[0]) for r in await wh_pg.fetch("SELECT * FROM webhook_event")}
        latencies = sorted(r.at * 1000 - xadd_ms[r.event_id] for r in receiver.requests if r.status == 200)
        print(
            f"\ndelivery latency, stream entry -> receiver, {n} events: median {latencies[n // 2]:.1f} ms, "
            f"max {latencies[-1]:.1f} ms"
        )
        assert len(latencies) == n and latencies[-1] < 1000


@pytest.mark.parametrize("enabled", [False])
async def test_with_webhooks_off_nothing_is_dispatched_or_sent(
    settings: Settings, redis: object, wh_pg: asyncpg.Pool, enabled: bool
) -> None:
    application = create_app(settings.model_copy(update={**FAST, "webhooks": enabled}))
    async with running(Receiver()) as receiver, application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://stockhold.test") as client:
            await subscribe(client, receiver)  # the endpoints still answer
            await expire_one(client)
            await asyncio.sleep(2.0)
            assert receiver.requests == []
            assert await wh_pg.fetchval("SELECT count(*) FROM webhook_delivery") == 0
            assert not hasattr(application.state, "webhook_dispatcher")
