"""The flash-sale hot path: POST /v1/reservations answered in plain ASGI, in front of FastAPI.

A reservation is the one call a flash sale multiplies by ten thousand. Through FastAPI it pays for the
framework's middleware stack, a Request object, dependency resolution (a threadpool hop per sync
dependency) and body validation through the framework's wrappers: profiled, that was most of the CPU
a reservation cost, several times what Redis needs. Here a well-formed request is checked by the same
body guard, parsed with orjson, validated by the very pydantic model the route declares, reserved by
the same StockService under the same Idempotency-Key rules, and answered with the same bytes.

The API key is checked as the route's dependency checks it (app/api/auth.py, the same Authenticator
and problem documents); a cache hit costs a dict lookup, one SHA-256 and a constant-time compare.

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

from app.api.auth import principal_of
from app.api.body_guard import read_guarded_body, replaying
from app.api.problems import from_auth_error, from_stock_error, internal_error, store_unavailable
from app.api.routes.reservations import reserve
from app.auth.errors import AuthError
from app.auth.scopes import Action, check_allowed
from app.stock.errors import StockError
from app.stock.idempotency import MAX_KEY_LENGTH
from app.stock.schemas import ReservationRequest

PATH = "/v1/reservations"
_IDEMPOTENCY_HEADER = b"idempotency-key"
_AUTHORIZATION_HEADER = b"authorization"
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
    key, key_ok, authorization = _headers(scope["headers"])
    if request is None or not key_ok:
        await fallback(scope, replaying(body, receive), send)  # FastAPI answers, and explains, the rest
        return
    try:
        principal = await principal_of(state, authorization)
        check_allowed(principal, Action.CHANGE_RESERVATIONS)
        response = await reserve(
            state.service, state.idempotency, state.rate_limiter, principal.tenant, request, key, PATH
        )
    except AuthError as exc:
        response = from_auth_error(exc, PATH)
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


def _headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, bool, list[str]]:
    """(Idempotency-Key or None, whether this path may take the request, the Authorization values).
    This path takes one well-formed Idempotency-Key or none. Header values decode as latin-1, as
    Starlette's do for the route."""
    keys: list[bytes] = []
    authorization: list[str] = []
    for name, value in headers:
        if name == _IDEMPOTENCY_HEADER:
            keys.append(value)
        elif name == _AUTHORIZATION_HEADER:
            authorization.append(value.decode("latin-1"))
    if not keys:
        return None, True, authorization
    if len(keys) == 1 and _KEY.fullmatch(keys[0]):
        return keys[0].decode("ascii"), True, authorization
    return None, False, authorization
