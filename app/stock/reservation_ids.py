"""Reservation ids name their home shard, so any replica finds a reservation with one key lookup.

Format: ``rsv_<home shard>_<16 lowercase base32 chars>`` (80 random bits). The home shard is the shard of
the reservation's first SKU; its part there also stores the reservation document.
"""

from __future__ import annotations

import os
import re

_ID = re.compile(r"^rsv_(0|[1-9][0-9]{0,4})_([a-z2-7]{16})$")


_ALPHABET = b"abcdefghijklmnopqrstuvwxyz234567"
# Each random byte picks one of the 32 characters: 256 is a multiple of 32, so every character is equally
# likely and 16 characters carry 80 bits.
_TO_BASE32 = bytes(_ALPHABET[b % 32] for b in range(256))
_TOKENS_PER_DRAW = 256
_tokens: list[str] = []


def _token() -> str:
    """80 random bits from the OS's CSPRNG as 16 base32 characters, drawn 256 tokens at a time: one
    urandom call and one C-level translate instead of a syscall and a pure-Python b32encode per id."""
    if not _tokens:
        text = os.urandom(16 * _TOKENS_PER_DRAW).translate(_TO_BASE32).decode()
        _tokens.extend(text[i : i + 16] for i in range(0, len(text), 16))
    return _tokens.pop()


def new_reservation_id(home_shard: int) -> str:
    return f"rsv_{home_shard}_{_token()}"


def home_shard_of(reservation_id: str, shard_count: int) -> int | None:
    """The home shard named by a well-formed id, or None when the id is malformed for this deployment."""
    match = _ID.match(reservation_id)
    if match is None:
        return None
    shard = int(match.group(1))
    return shard if shard < shard_count else None


def with_home(reservation_id: str, home_shard: int) -> str:
    """The same id's random part with another home shard. A reservation on a split SKU is reserved on the
    bucket it ends up in; each bucket it may try gives the id that bucket's shard as home, so the ids one
    request may have used are known in advance (a retry looks for them all: app/stock/service.py)."""
    token = reservation_id.rpartition("_")[2]
    return f"rsv_{home_shard}_{token}"
