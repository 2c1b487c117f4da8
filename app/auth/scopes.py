"""Scopes and what each allows: the one table of who may do what.

A key carries exactly one scope. The API declares, per endpoint, which ``Action`` it performs
(app/api/deps.py ``allowed_to``); this module alone decides which scopes may perform each action. The
README's "Tenants and API keys" table mirrors ``SCOPES_FOR`` endpoint by endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from app.auth.errors import Forbidden


class Scope(StrEnum):
    ADMIN = "admin"  # catalogue and stock changes (PUT /v1/skus/{sku}, adjustments)
    CHECKOUT = "checkout"  # reservations: reserve, confirm, release
    READ = "read"  # reading SKUs and reservations


class Action(StrEnum):
    CHANGE_CATALOGUE = "change the catalogue and its stock"
    CHANGE_RESERVATIONS = "reserve, confirm or release"
    READ = "read SKUs and reservations"


SCOPES_FOR: Mapping[Action, frozenset[Scope]] = MappingProxyType(
    {
        Action.CHANGE_CATALOGUE: frozenset({Scope.ADMIN}),
        Action.CHANGE_RESERVATIONS: frozenset({Scope.CHECKOUT}),
        # every key may read its own tenant's data: a checkout polls its reservations, an admin checks stock
        Action.READ: frozenset({Scope.READ, Scope.CHECKOUT, Scope.ADMIN}),
    }
)
EVERY_SCOPE = frozenset(Scope)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: a tenant and the scopes it holds (one per key; every scope for an
    unauthenticated request when the service runs open). ``key_id`` is None for such a request."""

    tenant: str
    scopes: frozenset[Scope]
    key_id: str | None = None


def check_allowed(principal: Principal, action: Action) -> None:
    """Raises Forbidden unless one of the principal's scopes may perform ``action``."""
    needed = SCOPES_FOR[action]
    if principal.scopes.isdisjoint(needed):
        names = " or ".join(sorted(needed))
        held = ", ".join(sorted(principal.scopes)) or "none"
        raise Forbidden(
            f"to {action.value} a key needs scope {names}; this key's scope is {held}",
            needed_scopes=sorted(needed),
            key_scopes=sorted(principal.scopes),
        )
