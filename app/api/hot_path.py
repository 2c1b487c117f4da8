"""The flash-sale hot path: POST /v1/reservations answered in plain ASGI, in front of FastAPI.

A reservation is the one call a flash sale multiplies by ten thousand. Through FastAPI it pays for the
framework's middleware stack, a Request object, dependency resolution (a threadpool hop per sync
dependency) and body validation through the framework's wrappers: profiled, that was most of the CPU
a reservation cost, several times what Redis needs. Here a well-formed request is checked by the same
body guard, parsed with orjson, validated by the very pydantic model the route declares, reserved by
the same StockService under the same Idempotency-Key rules, and answered with the same bytes.

Anything else goes to FastAPI unchanged: a body that does not parse or validate, an Idempotency-Key
header that is malformed or repeated. So every refusal of bad input (its status, ``code``, ``errors``
and wording) comes from the one place that has always made it, and the route stays what the OpenAPI
document describes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.body_guard import read_guarded_body, replaying
from app.api.deps import tenant_of
from app.api.problems import from_stock_error, internal_error, store_unavailable
from app.api.routes.reservations import reserve
from app.stock.errors import StockError
from app.stock.idempotency import MAX_KEY_LENGTH
from app.stock.schemas import ReservationRequest

PATH = "/v1/reservations"
_IDEMPOTENCY_HEADER = b"idempotency-key"
# The route's Header() constraints on Idempotency-Key (app/api/deps.py), as bytes
_KEY = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_KEY_LENGTH)

log = logging.getLogger(__name__)
ASGICall = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_hot(scope: Scope) -> bool:
    return bool(scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST")


async def serve_reserve(state: Any, scope: Scope, receive: Receive, send: Send, fallback: ASGICall) -> None:
    """Answers one POST /v1/reservations, or hands it to ``fallback`` (FastAPI) with its body."""
    body = await read_guarded_body(scope, receive, state.settings.max_body_bytes)
    if body is None:  # the client went away
        return
    if isinstance(body, Response):
        await body(scope, receive, send)
        return
    request = _parse(body)
    key, key_ok = _idempotency_key(scope["headers"])
    if request is None or not key_ok:
        await fallback(scope, replaying(body, receive), send)  # FastAPI answers, and explains, the rest
        return
    try:
        response = await reserve(
            state.service, state.idempotency, state.rate_limiter, tenant_of(state), request, key, PATH
        )
    except StockError as exc:
        response = from_stock_error(exc, PATH)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        response = store_unavailable(exc, PATH)
    except Exception:
        # as FastAPI's ServerErrorMiddleware does: answer 500, then raise on for the server to log
        log.exception("unhandled error on POST %s", PATH)
        await internal_error(PATH)(scope, receive, send)
        raise
    await response(scope, receive, send)


def _parse(body: bytes) -> ReservationRequest | None:
    # orjson is stricter than the json module FastAPI uses (no NaN, no lone surrogates, UTF-8 only), so
    # what it accepts json.loads reads the same; what it refuses, FastAPI judges.
    try:
        return ReservationRequest.model_validate(orjson.loads(body))
    except ValueError:  # orjson.JSONDecodeError and pydantic's ValidationError both are
        return None


def _idempotency_key(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, bool]:
    """(key or None, whether this path may take the request): one well-formed Idempotency-Key or none."""
    values = [value for name, value in headers if name == _IDEMPOTENCY_HEADER]
    if not values:
        return None, True
    if len(values) == 1 and _KEY.fullmatch(values[0]):
        return values[0].decode("ascii"), True
    return None, False
