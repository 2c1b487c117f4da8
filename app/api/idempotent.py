"""Runs a multi-call operation (reserve, confirm, release) under an Idempotency-Key claim.

See app/stock/idempotency.py for the contract. Domain refusals (4xx) are stored and replayed like
successes; transient answers (503 not_ready or ledger_unavailable, 409 reservation_busy, 429 hold_cooldown
or rate_limited) and unexpected failures are not stored, so a retry runs the operation again with the same reference,
which the scripts make safe.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi.responses import Response

from app.api.problems import from_stock_error
from app.api.responses import stored_response
from app.stock.errors import LedgerUnavailable, NotReady, ReservationBusy, RetryLater, StockError
from app.stock.idempotency import ClaimState, IdempotencyRequest, IdempotencyStore, fingerprint


async def run_idempotent(
    store: IdempotencyStore,
    tenant: str,
    key: str | None,
    scope: str,
    body: Callable[[], object],
    ref: str,
    instance: str,
    operation: Callable[[str, bool], Awaitable[Response]],
) -> Response:
    """Runs ``operation(ref, retry)``; ``retry`` is true when an earlier attempt with this key claimed
    the same ref and may have done part of the work. ``body`` is called only when a key was sent."""
    if key is None:
        return await operation(ref, False)
    request = IdempotencyRequest(key=key, scope=scope, fingerprint=fingerprint(scope, body()))
    claim = await store.claim(tenant, request, ref)
    if claim.state == ClaimState.ANSWERED:
        return stored_response(claim.status, claim.body)
    try:
        response = await operation(claim.ref, claim.state == ClaimState.RETRY)
    except (NotReady, ReservationBusy, LedgerUnavailable, RetryLater):
        raise  # transient: not the request's answer, so not stored
    except StockError as exc:
        response = from_stock_error(exc, instance)
    await store.store(tenant, request, response.status_code, bytes(response.body))
    return response
