"""The signature scheme the README documents, checked against an independent computation."""

from __future__ import annotations

import hashlib
import hmac

from app.webhooks.signing import SECRET_PREFIX, new_secret, signature, verify

SECRET = "whsec_test"
BODY = b'{"id":"evt_1","type":"sold_out"}'


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(b"whsec_test", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert signature(SECRET, 1700000000, BODY) == f"v1={expected}"


def test_verify_accepts_the_signature_and_refuses_tampering_and_old_timestamps() -> None:
    header = signature(SECRET, 1700000000, BODY)
    assert verify(SECRET, "1700000000", BODY, header, now=1700000010)
    assert verify(SECRET, "1700000000", BODY, f"v1=deadbeef, {header}", now=1700000010)  # one of several
    assert not verify(SECRET, "1700000000", BODY + b" ", header, now=1700000010)
    assert not verify("whsec_other", "1700000000", BODY, header, now=1700000010)
    assert not verify(SECRET, "1700000001", BODY, header, now=1700000010)
    assert not verify(SECRET, "1700000000", BODY, header, now=1700000000 + 301)
    assert not verify(SECRET, "x", BODY, header, now=1700000010)


def test_secrets_are_random_and_prefixed() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith(SECRET_PREFIX) and len(a) == len(SECRET_PREFIX) + 43
