"""API key format: ``shk_<id>_<secret>``.

- ``id``: 12 characters of lowercase base32 (60 random bits), public: the lookup handle that
  `stockhold keys list` shows and `keys revoke` takes. Random rather than a sequence, so ids say nothing
  about how many keys or tenants exist.
- ``secret``: ``secrets.token_urlsafe(32)``, 256 random bits as 43 URL-safe base64 characters.

Only SHA-256 of the secret is stored. A slow password hash (bcrypt, argon2) exists to make guessing
low-entropy human passwords expensive; a 256-bit random secret cannot be guessed whatever the hash, and a
slow hash would add milliseconds to every request. Digests are compared with ``hmac.compare_digest``,
whose time does not depend on where the first differing byte is.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "shk"
ID_LENGTH = 12
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lowercase: no look-alike 0/O, 1/l
SECRET_BYTES = 32
_SECRET_LENGTH = 43  # token_urlsafe(32): 32 bytes as unpadded base64url
KEY_ID_PATTERN = rf"^[a-z2-7]{{{ID_LENGTH}}}$"
_TOKEN = re.compile(rf"{PREFIX}_([a-z2-7]{{{ID_LENGTH}}})_([A-Za-z0-9_-]{{{_SECRET_LENGTH}}})")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as its holder sends it. ``repr`` hides the secret, so it never lands in a log by accident."""

    id: str
    secret: str

    @property
    def token(self) -> str:
        return f"{PREFIX}_{self.id}_{self.secret}"

    def __repr__(self) -> str:
        return f"ApiKey(id={self.id!r}, secret=<hidden>)"


def new_key() -> ApiKey:
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))
    return ApiKey(key_id, secrets.token_urlsafe(SECRET_BYTES))


def parse_key(token: str) -> ApiKey | None:
    """The key in ``token``, or None when it is not of the form ``shk_<id>_<secret>``."""
    parts = split_key(token)
    return ApiKey(*parts) if parts else None


def split_key(token: str) -> tuple[str, str] | None:
    """(id, secret) of ``token``, or None: parse_key without building an ApiKey (a frozen dataclass costs
    a microsecond to build; this runs on every authenticated request)."""
    match = _TOKEN.fullmatch(token)
    return match.group(1, 2) if match else None  # type: ignore[return-value]


def secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def secret_matches(secret: str, digest: bytes) -> bool:
    """Constant-time comparison of the secret's digest with the stored one."""
    return hmac.compare_digest(secret_digest(secret), digest)
