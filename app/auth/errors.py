"""Authentication errors, each with a stable machine ``code``; app/api/problems.py turns them into
problem documents (401 and 403)."""

from __future__ import annotations

from typing import Any


class AuthError(Exception):
    code = "auth_error"
    title = "Authentication error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class Unauthenticated(AuthError):
    """No key, a malformed one, or one that is unknown, revoked or has the wrong secret (401). The three
    last are one message on purpose: a caller learns nothing about which key ids exist."""

    code = "unauthenticated"
    title = "Unauthenticated"

    def __init__(self, detail: str, error: str | None = None) -> None:
        super().__init__(detail)
        # RFC 6750's error attribute for WWW-Authenticate: "invalid_token" for a key sent but refused,
        # none when no key was sent at all
        self.error = error


class Forbidden(AuthError):
    """A valid key whose scope does not allow the call (403)."""

    code = "forbidden"
    title = "Forbidden"


class UnknownKey(LookupError):
    """`keys revoke` of an id that was never issued."""


class InvalidTenant(ValueError):
    """A tenant id that is not of the SKU-id form."""
