"""The audit on its own (`python -m loadtests.audit`) catches planted violations, each of the invariant it
is meant to prove, after passing on the same state before the plant (so the failure is the plant's).

State: a SKU of 3 units; buyer-1 and scalper-7-2 bought one each (what their outcomes file says), buyer-2
holds one. Made over HTTP against a real `stockhold serve`, so every row the audit reads is the service's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from tests.conftest import SHARDS, TENANT
from tests.loadtests.conftest import run_module

Outcomes = dict[str, Any]


async def _sale(http: httpx.AsyncClient, user_id: str, sku: str, pay: bool) -> dict[str, Any]:
    items = [{"sku": sku, "quantity": 1}]
    held = await http.post("/v1/reservations", json={"user_id": user_id, "items": items})
    assert held.status_code == 201, held.text
    rid = held.json()["id"]
    if pay:
        paid = await http.post(f"/v1/reservations/{rid}/confirm")
        assert paid.status_code == 200, paid.text
    return {"id": rid, "user_id": user_id, "items": items}


def _audit(server: str, env: dict[str, str], sku: str, outcomes: Path, settle_s: float) -> tuple[int, str]:
    args = [
        *("--url", server, "--database-url", env["DATABASE_URL"], "--redis-url", env["REDIS_URL"]),
        *("--skus", sku, "--outcomes", str(outcomes), "--settle-timeout", str(settle_s)),
    ]
    done = run_module("loadtests.audit", args, env, 120)
    return done.returncode, done.stdout


async def _delete_confirmed_line(pg: asyncpg.Pool, redis: Redis, sku: str, outcomes: Outcomes) -> str:
    rid = str(outcomes["confirmed"][0]["id"])
    assert await pg.execute("DELETE FROM reservation_line WHERE reservation_id = $1", rid) == "DELETE 1"
    return rid


async def _claim_a_sale_postgres_lacks(pg: asyncpg.Pool, redis: Redis, sku: str, outcomes: Outcomes) -> str:
    forged = "rsv_3_aaaaaaaaaaaaaaaa"
    outcomes["confirmed"].append({"id": forged, "user_id": "buyer-99", "items": [{"sku": sku, "quantity": 1}]})
    return forged


async def _forget_a_sale(pg: asyncpg.Pool, redis: Redis, sku: str, outcomes: Outcomes) -> str:
    # PostgreSQL holds a sale its buyer was never told of, and never left unanswered either
    return str(outcomes["confirmed"].pop()["id"])


async def _oversell_in_redis(pg: asyncpg.Pool, redis: Redis, sku: str, outcomes: Outcomes) -> str:
    keys = KeySpace(SHARDS)
    await redis.hincrby(keys.sku(keys.shard_of(TENANT, sku), TENANT, sku), "sold", 5)
    return sku


async def _record_an_unexpected_answer(pg: asyncpg.Pool, redis: Redis, sku: str, outcomes: Outcomes) -> str:
    outcomes["unexpected"]["buyer: reserve: HTTP 500 with a body that is not JSON"] = 1
    return "HTTP 500"


Plant = Callable[[asyncpg.Pool, Redis, str, Outcomes], Any]


@pytest.mark.parametrize(
    ("plant", "broken"),
    [
        (_delete_confirmed_line, "every confirmed sale persisted"),
        (_claim_a_sale_postgres_lacks, "every confirmed sale persisted"),
        (_forget_a_sale, "sold is what buyers were told"),
        (_oversell_in_redis, "no oversell"),
        (_record_an_unexpected_answer, "every response expected"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
async def test_audit_catches_a_planted_violation(
    plant: Plant,
    broken: str,
    server: str,
    service_env: dict[str, str],
    pg: asyncpg.Pool,
    redis: Redis,
    tmp_path: Path,
) -> None:
    sku = f"audit-{uuid.uuid4().hex[:12]}"
    async with httpx.AsyncClient(base_url=server, timeout=10) as http:
        put = await http.put(f"/v1/skus/{sku}", json={"on_hand": 3, "per_user_limit": 1})
        assert put.status_code == 201, put.text
        sales = [await _sale(http, "buyer-1", sku, pay=True), await _sale(http, "scalper-7-2", sku, pay=True)]
        await _sale(http, "buyer-2", sku, pay=False)
    outcomes: Outcomes = {"confirmed": sales, "unknown": [], "responses": {"buyer: reserve -> 201": 2}}
    outcomes["unexpected"] = {}
    path = tmp_path / "outcomes.json"
    path.write_text(json.dumps(outcomes))

    code, text = _audit(server, service_env, sku, path, settle_s=30)
    assert code == 0, text  # the state as the service made it passes
    assert "winners (PostgreSQL, confirmed units): buyers 1 (50%, 1 accounts); scalpers 1 (50%" in text

    named = await plant(pg, redis, sku, outcomes)
    path.write_text(json.dumps(outcomes))
    code, text = _audit(server, service_env, sku, path, settle_s=3)

    assert code == 1, text
    assert f"FAIL  {broken}:" in text, text
    failing = next(line for line in text.splitlines() if line.startswith(f"FAIL  {broken}:"))
    assert named in failing, text  # says which reservation, SKU or answer broke it
    assert "verdict: BROKEN" in text
