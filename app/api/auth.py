"""API keys at the HTTP edge: the ``Authorization: Bearer <key>`` header to a Principal, for the FastAPI
routes (app/api/deps.py) and the reserve hot path (app/api/hot_path.py) alike, so both refuse the same
requests with the same problem documents.

With keys required, a request without one is 401. Running open (STOCKHOLD_REQUIRE_AUTH=false, or the
embedded `make run` by default), a request without a key acts for STOCKHOLD_TENANT with every scope; a
request that does send a key is still checked, so a bad key is 401 either way.
"""

from __future__ import annotations

from typing import Any

from app.auth.authenticator import MALFORMED, Authenticator
from app.auth.errors import Unauthenticated
from app.auth.scopes import EVERY_SCOPE, Principal
from app.config import Settings

MISSING = "this call needs an API key: `Authorization: Bearer shk_<id>_<secret>` (see `stockhold keys create`)"


def open_mode_notice(settings: Settings) -> str:
    """What /readyz, the start-up log and `stockhold serve` say while the service runs open."""
    return (
        f"open: unauthenticated requests act as tenant {settings.default_tenant!r} with every scope; "
        "set STOCKHOLD_REQUIRE_AUTH=true"
    )


def open_principal(settings: Settings) -> Principal | None:
    """Who a request without a key acts for: None when keys are required."""
    return None if settings.auth_required else Principal(settings.default_tenant, EVERY_SCOPE)


async def principal_of(state: Any, authorization: list[str]) -> Principal:
    """The principal of a request whose Authorization header values are ``authorization``."""
    if not authorization:
        anonymous: Principal | None = state.open_principal
        if anonymous is None:
            raise Unauthenticated(MISSING)
        return anonymous
    if len(authorization) > 1:
        raise Unauthenticated(MALFORMED, error="invalid_token")
    scheme, _, token = authorization[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthenticated(MALFORMED)  # another scheme (Basic...): no bearer error code, per RFC 6750
    authenticator: Authenticator = state.authenticator
    return await authenticator.authenticate(token.strip())
