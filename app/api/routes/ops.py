"""Operations: liveness and readiness."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.problems import problem

router = APIRouter(tags=["operations"])
_CHECK_TIMEOUT_SECONDS = 1.0


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis and PostgreSQL answer, every shard is rebuilt, the sweeper runs")
async def readyz(request: Request) -> Response:
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(state.redis.ping(), _CHECK_TIMEOUT_SECONDS)
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"failed: {type(exc).__name__}"
    try:
        await asyncio.wait_for(state.pg.fetchval("SELECT 1"), _CHECK_TIMEOUT_SECONDS)
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"failed: {type(exc).__name__}"
    if checks["redis"] == "ok":
        try:
            missing = await asyncio.wait_for(state.watch.rebuilder.missing_shards(), _CHECK_TIMEOUT_SECONDS)
            checks["rebuilt"] = "ok" if not missing else f"failed: shards {missing} await a rebuild from PostgreSQL"
        except Exception as exc:
            checks["rebuilt"] = f"failed: {type(exc).__name__}"
    checks["sweeper"] = "ok" if state.sweeper_task is not None and not state.sweeper_task.done() else "stopped"
    if all(v == "ok" for v in checks.values()):
        return Response(orjson.dumps({"status": "ready", "checks": checks}), media_type="application/json")
    failing = ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
    return problem(503, "not_ready", "Service not ready", f"not ready: {failing}", request.url.path, checks=checks)
