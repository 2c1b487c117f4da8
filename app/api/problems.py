"""RFC 9457 problem documents: every error stockhold answers has type, title, status, detail and a
stable machine ``code`` (plus extra fields where useful, e.g. per-item ``available``)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth.errors import AuthError, Forbidden, Unauthenticated
from app.stock import errors
from app.telemetry.context import note_code
from app.webhooks.errors import WebhookNotFound

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[errors.StockError], int] = {
    errors.SkuNotFound: 404,
    errors.ReservationNotFound: 404,
    errors.ListingNotFound: 404,
    errors.ReservationTooLarge: 422,
    errors.InsufficientStock: 409,
    errors.LimitExceeded: 409,
    errors.NotEligible: 403,
    errors.HoldCooldown: 429,
    errors.RateLimited: 429,
    errors.StockConflict: 409,
    errors.TooManyChannels: 409,
    errors.SplitConflict: 409,
    errors.ReservationReleased: 409,
    errors.ReservationConfirmed: 409,
    # The IETF Idempotency-Key draft: a key reused with another payload is 422.
    errors.IdempotencyConflict: 422,
    errors.ReservationBusy: 409,
    errors.NotReady: 503,
    errors.LedgerUnavailable: 503,
    WebhookNotFound: 404,
}

_HTTP_CODES = {
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


def problem(status: int, code: str, title: str, detail: str, instance: str | None = None, **extra: Any) -> Response:
    body: dict[str, Any] = {
        "type": f"urn:stockhold:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    note_code(code)  # the reservation metrics count refusals by this code (app/api/observe.py)
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON)


def from_stock_error(exc: errors.StockError, instance: str | None = None) -> Response:
    status = STATUS_BY_ERROR.get(type(exc), 400)
    response = problem(status, exc.code, exc.title, exc.detail, instance, **exc.extra)
    if status == 503:
        response.headers["Retry-After"] = "1"  # a rebuild or PostgreSQL's return: worth retrying soon
    elif isinstance(exc, errors.RetryLater):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def from_auth_error(exc: AuthError, instance: str | None = None) -> Response:
    """401 unauthenticated or 403 forbidden, with the Bearer challenge of RFC 6750."""
    status = 403 if isinstance(exc, Forbidden) else 401
    response = problem(status, exc.code, exc.title, exc.detail, instance, **exc.extra)
    challenge = 'Bearer realm="stockhold"'
    if isinstance(exc, Unauthenticated) and exc.error:
        challenge += f', error="{exc.error}"'
    elif isinstance(exc, Forbidden):
        challenge += f', error="insufficient_scope", scope="{" ".join(exc.extra.get("needed_scopes", []))}"'
    response.headers["WWW-Authenticate"] = challenge
    return response


def store_unavailable(exc: Exception, instance: str | None = None) -> Response:
    """Redis unreachable or too slow: 503 not_ready, worth retrying soon."""
    log.warning("Redis unavailable: %r", exc)
    response = problem(503, "not_ready", "Service not ready", "the stock store is unavailable; retry shortly", instance)
    response.headers["Retry-After"] = "1"
    return response


def internal_error(instance: str | None = None) -> Response:
    return problem(500, "internal_error", "Internal error", "an unexpected error occurred", instance)


def validation_problem(
    detail: str, instance: str | None = None, errors_: list[dict[str, Any]] | None = None
) -> Response:
    extra = {"errors": errors_} if errors_ is not None else {}
    return problem(422, "validation_error", "Request is not valid", detail, instance, **extra)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.StockError)
    async def _stock_error(request: Request, exc: errors.StockError) -> Response:
        return from_stock_error(exc, request.url.path)

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, exc: AuthError) -> Response:
        return from_auth_error(exc, request.url.path)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> Response:
        return store_unavailable(exc, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        raw = exc.errors()
        if any(e.get("type") == "json_invalid" for e in raw):
            return problem(
                400, "malformed_json", "Malformed JSON", "the request body is not valid JSON", request.url.path
            )
        cleaned = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in raw
        ]
        detail = "; ".join(f"{'.'.join(e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in cleaned)
        return validation_problem(detail, request.url.path, cleaned)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            # FastAPI raises a bare 400 when the body cannot even be decoded (not UTF-8, nested too deep)
            detail = "the request body is not valid JSON"
            return problem(400, "malformed_json", "Malformed JSON", detail, request.url.path)
        code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        return problem(exc.status_code, code, title, str(exc.detail), request.url.path)
