"""API key format, parsing and digests (app/auth/tokens.py)."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from app.auth import tokens
from app.auth.tokens import ApiKey, new_key, parse_key, secret_digest, secret_matches


def test_a_new_key_is_shk_id_secret_and_parses_back() -> None:
    key = new_key()

    assert re.fullmatch(r"shk_[a-z2-7]{12}_[A-Za-z0-9_-]{43}", key.token), key.token
    assert parse_key(key.token) == key


def test_keys_are_random() -> None:
    made = [new_key() for _ in range(200)]

    assert len({k.id for k in made}) == 200
    assert len({k.secret for k in made}) == 200


def test_the_secret_never_shows_in_repr() -> None:
    key = new_key()

    assert key.secret not in repr(key)
    assert key.id in repr(key)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "shk_",
        "Bearer shk_abcdefghijkl_" + "a" * 43,  # the scheme belongs to the header, not the key
        "shk_abcdefghijkl_" + "a" * 42,  # secret too short
        "shk_abcdefghijkl_" + "a" * 44,  # too long
        "shk_abcdefghijk_" + "a" * 43,  # id too short
        "shk_ABCDEFGHIJKL_" + "a" * 43,  # id not lowercase base32
        "shk_abcdefghijk1_" + "a" * 43,  # 1 is not base32
        "skh_abcdefghijkl_" + "a" * 43,  # wrong prefix
        "shk_abcdefghijkl-" + "a" * 43,  # wrong separator
        "shk_abcdefghijkl_" + "a" * 42 + "=",  # not base64url
        "shk_abcdefghijkl_" + "a" * 42 + "\n",
        " shk_abcdefghijkl_" + "a" * 43,
    ],
)
def test_anything_else_does_not_parse(token: str) -> None:
    assert parse_key(token) is None


def test_the_stored_digest_is_sha256_of_the_secret() -> None:
    key = new_key()

    assert secret_digest(key.secret) == hashlib.sha256(key.secret.encode()).digest()
    assert secret_matches(key.secret, secret_digest(key.secret))
    assert not secret_matches(key.secret[:-1] + ("A" if key.secret[-1] != "A" else "B"), secret_digest(key.secret))


def test_the_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", recording)
    key = ApiKey("abcdefghijkl", "s" * 43)

    assert secret_matches(key.secret, secret_digest(key.secret))
    assert calls == [(secret_digest(key.secret), secret_digest(key.secret))]
