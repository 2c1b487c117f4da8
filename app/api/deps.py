"""Dependencies of the routes, as Annotated aliases.

They are plain functions on purpose, for now: FastAPI runs them in its threadpool (40 threads), which
happens to bound how many requests reach Redis at once. Made async (measured: no threadpool hop), a burst of
2,000 in-process requests queued on the 128-connection pool past its 5 s timeout and ~10% got 503. Explicit
admission control belongs with the hot-path work (issue 4) before these change. The API key dependencies
are the exception: async, since a key lookup awaits PostgreSQL on a miss; the service and store ones
beside them still take the threadpool hop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.auth import principal_of
from app.auth.scopes import Action, Principal, check_allowed
from app.stock.idempotency import MAX_KEY_LENGTH, IdempotencyStore
from app.stock.rate_limits import RateLimiter
from app.stock.service import StockService

# Declares the Bearer scheme in the OpenAPI document (/docs gets its "Authorize" button). It parses
# nothing itself (auto_error=False): principal_of reads the header, as the hot path does.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `stockhold keys create`: `Authorization: Bearer shk_<id>_<secret>`.",
)


def get_service(request: Request) -> StockService:
    service: StockService = request.app.state.service
    return service


def get_idempotency_store(request: Request) -> IdempotencyStore:
    store: IdempotencyStore = request.app.state.idempotency
    return store


def get_rate_limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.rate_limiter
    return limiter


async def get_principal(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> Principal:
    """Async: a cache hit needs no thread, and a miss awaits PostgreSQL."""
    return await principal_of(request.app.state, request.headers.getlist("authorization"))


def tenant_allowed_to(action: Action) -> Callable[[Principal], Awaitable[str]]:
    """A dependency giving the tenant a request acts for, once its key may perform ``action`` (401 and
    403 otherwise, before anything is read or changed). Which scopes may: app/auth/scopes.py."""

    async def tenant(principal: Annotated[Principal, Depends(get_principal)]) -> str:
        check_allowed(principal, action)
        return principal.tenant

    return tenant


ServiceDep = Annotated[StockService, Depends(get_service)]
IdempotencyStoreDep = Annotated[IdempotencyStore, Depends(get_idempotency_store)]
RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]
# The tenant of a request allowed to perform the action: each route declares the one it performs.
CatalogueTenant = Annotated[str, Depends(tenant_allowed_to(Action.CHANGE_CATALOGUE))]
CheckoutTenant = Annotated[str, Depends(tenant_allowed_to(Action.CHANGE_RESERVATIONS))]
ReaderTenant = Annotated[str, Depends(tenant_allowed_to(Action.READ))]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        pattern=r"^[\x21-\x7e]+$",
        description="Retry safely: the same key and body replays the first answer; "
        "the same key with another body is refused (idempotency_conflict).",
    ),
]
