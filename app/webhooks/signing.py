"""The signature scheme of webhook deliveries (the README's "Webhooks" section documents it for receivers).

Each delivery carries ``Webhook-Id`` (the event id, the same on every attempt and every endpoint),
``Webhook-Timestamp`` (unix seconds when this attempt was signed) and
``Webhook-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>``, the key being the endpoint's
secret as its UTF-8 bytes (the whole ``whsec_...`` string) and the body the exact bytes POSTed. Signing the
timestamp with the body lets a receiver refuse replays older than a few minutes. The ``v1=`` prefix leaves
room for another scheme (or several signatures during a secret rotation) without breaking receivers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"
SCHEME = "v1"
# How far a receiver should let the timestamp drift from its clock (what verify() allows by default).
TOLERANCE_S = 300


def new_secret() -> str:
    """256 random bits, URL-safe base64, behind a prefix that makes a leaked secret easy to recognise."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Webhook-Signature`` header value for one attempt."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, header: str, now: float, tolerance_s: int = TOLERANCE_S) -> bool:
    """What a receiver does: the timestamp is recent and one of the header's ``v1=`` signatures matches
    (compared in constant time)."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance_s:
        return False
    expected = signature(secret, int(timestamp), body)
    return any(hmac.compare_digest(expected, part.strip()) for part in header.split(","))
