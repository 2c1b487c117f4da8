"""Checkout routes: reserve, read, confirm (payment arrived), release (cancel)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from app.api.deps import (
    CheckoutTenant,
    IdempotencyKeyHeader,
    IdempotencyStoreDep,
    RateLimiterDep,
    ReaderTenant,
    ServiceDep,
)
from app.api.idempotent import run_idempotent
from app.api.responses import AUTH_RESPONSES, json_response, problem_schema
from app.stock.errors import InsufficientStock, ListingNotFound, ReservationNotFound, ReservationTooLarge
from app.stock.idempotency import IdempotencyStore
from app.stock.rate_limits import RateLimiter
from app.stock.reservation_ids import new_reservation_id
from app.stock.schemas import Reservation, ReservationRequest
from app.stock.service import StockService
from app.telemetry.context import note_outcome

router = APIRouter(prefix="/v1/reservations", tags=["checkout"], responses=AUTH_RESPONSES)


def _no_body() -> None:
    """confirm and release take no body: their fingerprint is method and path alone."""


async def _act(
    request: Request,
    store: IdempotencyStore,
    tenant: str,
    idempotency_key: str | None,
    reservation_id: str,
    action: Callable[[str, str], Awaitable[Reservation]],
) -> Response:
    """Runs confirm or release under the request's Idempotency-Key, if any."""

    async def run(_: str, __: bool) -> Response:
        return json_response(await action(tenant, reservation_id))

    path = request.url.path
    return await run_idempotent(store, tenant, idempotency_key, f"POST {path}", _no_body, reservation_id, path, run)


ReservationPath = Annotated[
    str, Path(pattern=r"^rsv_[0-9]{1,5}_[a-z2-7]{16}$", description="Reservation id as returned by POST")
]


@router.post(
    "",
    status_code=201,
    response_model=Reservation,
    summary="Reserve stock, all-or-nothing",
    responses={
        # replaces the router's 403 in the OpenAPI document, so it names both
        403: problem_schema("forbidden (the key's scope) / not_eligible (names the eligibility rule the buyer fails)"),
        404: problem_schema("sku_not_found / listing_not_found"),
        409: problem_schema(
            "insufficient_stock (with per-item available) / limit_exceeded (rule per_user_limit or max_per_order)"
        ),
        422: problem_schema("validation_error / idempotency_conflict"),
        429: problem_schema("hold_cooldown / rate_limited, with Retry-After"),
        503: problem_schema("not_ready"),
    },
)
async def create_reservation(
    body: ReservationRequest,
    request: Request,
    service: ServiceDep,
    store: IdempotencyStoreDep,
    tenant: CheckoutTenant,
    limiter: RateLimiterDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    return await reserve(service, store, limiter, tenant, body, idempotency_key, request.url.path)


def canonical_body(body: ReservationRequest) -> dict[str, object]:
    """What an Idempotency-Key's fingerprint covers: the body as sent, fields left at their defaults
    omitted, so a field added to the API later leaves the fingerprints of older requests as they were."""
    return body.model_dump(mode="json", exclude_defaults=True)


async def reserve(
    service: StockService,
    store: IdempotencyStore,
    limiter: RateLimiter,
    tenant: str,
    body: ReservationRequest,
    idempotency_key: str | None,
    instance: str,
) -> Response:
    """The reservation under its Idempotency-Key, if any; the route and the hot path (app/api/hot_path.py)
    both answer through here. Listing lines are expanded into SKU lines first (app/stock/listings.py).
    Then, inside the operation the key guards (so a retry of an answered request is replayed, never
    refused anew): a SKU this process knows is sold out is refused from memory (app/stock/sold_out.py),
    and the per-user rate limit is checked; a rate limit's 429 is not stored, so a retry runs afresh.
    A listing that cannot be expanded (not found, too large) is refused under the key too, so a retry of an
    answered request is replayed even if its listing changed since. The metrics learn the outcomes a status
    and a problem code do not tell apart (note_outcome)."""
    stock: ReservationRequest | ListingNotFound | ReservationTooLarge
    try:
        stock = await service.expand_listings(tenant, body)  # listing lines become SKU lines
    except (ListingNotFound, ReservationTooLarge) as refusal:
        # answered inside the key's operation: a retry of a request answered before (its listing changed or
        # gone since) gets that first answer replayed, not this refusal. A transient failure (not_ready) is
        # raised here, before any claim: a claim's reservation id must name the home shard it will have.
        stock = refusal
    ran = False

    async def run(reservation_id: str, retry: bool) -> Response:
        nonlocal ran
        ran = True
        if not isinstance(stock, ReservationRequest):
            if retry:  # an earlier attempt, cut short, may have reserved under this id before the listing changed
                with contextlib.suppress(ReservationNotFound):
                    made = json_response(await service.get_reservation(tenant, reservation_id), 201)
                    note_outcome("reserved")
                    return made
            raise stock
        try:
            service.refuse_known_sold_out(tenant, stock)
        except InsufficientStock:
            note_outcome("sold_out_fast_path")
            raise
        await limiter.check_user(tenant, body.user_id)
        response = json_response(await service.reserve(tenant, stock, reservation_id, retry), 201)
        note_outcome("reserved")
        return response

    response = await run_idempotent(
        store,
        tenant,
        idempotency_key,
        "POST /v1/reservations",
        lambda: canonical_body(body),
        # an id for a request refused before any script runs is never used: any home shard does
        service.new_reservation_id(tenant, stock) if isinstance(stock, ReservationRequest) else new_reservation_id(0),
        instance,
        run,
    )
    if not ran:  # the key's first answer, replayed
        note_outcome("idempotent_replay")
    return response


@router.get(
    "/{reservation_id}",
    response_model=Reservation,
    summary="Read a reservation",
    responses={404: problem_schema("reservation_not_found")},
)
async def get_reservation(reservation_id: ReservationPath, service: ServiceDep, tenant: ReaderTenant) -> Response:
    return json_response(await service.get_reservation(tenant, reservation_id))


@router.post(
    "/{reservation_id}/confirm",
    response_model=Reservation,
    summary="Payment arrived: confirm the sale",
    responses={
        404: problem_schema("reservation_not_found"),
        409: problem_schema("insufficient_stock (expired or pending, stock gone) / reservation_released"),
        422: problem_schema("validation_error / idempotency_conflict"),
    },
)
async def confirm_reservation(
    reservation_id: ReservationPath,
    request: Request,
    service: ServiceDep,
    store: IdempotencyStoreDep,
    tenant: CheckoutTenant,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    return await _act(request, store, tenant, idempotency_key, reservation_id, service.confirm)


@router.post(
    "/{reservation_id}/release",
    response_model=Reservation,
    summary="Cancel: give the held stock back",
    responses={
        404: problem_schema("reservation_not_found"),
        409: problem_schema("reservation_confirmed"),
        422: problem_schema("validation_error / idempotency_conflict"),
    },
)
async def release_reservation(
    reservation_id: ReservationPath,
    request: Request,
    service: ServiceDep,
    store: IdempotencyStoreDep,
    tenant: CheckoutTenant,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    return await _act(request, store, tenant, idempotency_key, reservation_id, service.release)
