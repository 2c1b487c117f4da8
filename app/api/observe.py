"""The outermost layer of every HTTP request: its id, its latency, and a reservation's outcome.

In front of everything else (the per-IP limit and the reserve hot path included), in plain ASGI: the id
is the client's X-Request-ID when well formed (app/telemetry/context.py) or a new one, echoed in the
answer's X-Request-ID header and put in the request's context, where every log record emitted while
answering finds it. When the answer is sent, the latency goes into the histogram under the route's
template (``/v1/reservations/{reservation_id}/confirm``, never the raw path, which would mint a series
per reservation) and a POST /v1/reservations is counted by outcome: what the reservation code noted
(reserved, idempotent_replay, sold_out_fast_path), else the code of the problem document answered.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.hot_path import PATH as RESERVATIONS
from app.telemetry.context import CURRENT, HEADER, RequestContext, request_id_of
from app.telemetry.metrics import UNMATCHED_ROUTE, Metrics


def route_of(scope: Scope) -> str:
    """The template of the route that answered (FastAPI's router notes it in the scope), or
    UNMATCHED_ROUTE; the hot path answers POST /v1/reservations without a router."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", UNMATCHED_ROUTE))
    if scope["path"] == RESERVATIONS:
        return RESERVATIONS
    return UNMATCHED_ROUTE


def outcome_of(ctx: RequestContext, status: int) -> str:
    if ctx.outcome is not None:
        return ctx.outcome
    if ctx.code is not None and ctx.code != "internal_error":
        return ctx.code
    return "reserved" if status == 201 else "error"


async def observe(metrics: Metrics, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
    ctx = RequestContext(request_id_of(scope["headers"]))
    token = CURRENT.set(ctx)
    echoed = (HEADER, ctx.request_id.encode("ascii"))
    status = 0
    started = time.perf_counter()

    async def send_with_id(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            message["headers"] = [*message.get("headers", ()), echoed]
        await send(message)

    try:
        await app(scope, receive, send_with_id)
    except BaseException:
        status = status or 500  # the server answers 500 for an app that raised before answering
        raise
    finally:
        method: str = scope["method"]
        metrics.observe_request(method, route_of(scope), status, time.perf_counter() - started)
        if method == "POST" and scope["path"] == RESERVATIONS:
            metrics.count_reservation(outcome_of(ctx, status))
        CURRENT.reset(token)
