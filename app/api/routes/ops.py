"""Operations: liveness and readiness."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.auth import open_mode_notice
from app.api.problems import problem

router = APIRouter(tags=["operations"])
_CHECK_TIMEOUT_SECONDS = 1.0


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Redis and PostgreSQL answer, every shard is rebuilt, the sweeper runs; says whether API keys are required",
)
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
    # Not a check (an open service is ready): said on every probe so that nobody misses it.
    auth = "required" if state.settings.auth_required else open_mode_notice(state.settings)
    if all(v == "ok" for v in checks.values()):
        body = {"status": "ready", "checks": checks, "auth": auth}
        return Response(orjson.dumps(body), media_type="application/json")
    failing = ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
    detail = f"not ready: {failing}"
    return problem(503, "not_ready", "Service not ready", detail, request.url.path, checks=checks, auth=auth)
