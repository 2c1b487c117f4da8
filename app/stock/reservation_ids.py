"""Reservation ids name their home shard, so any replica finds a reservation with one key lookup.

Format: ``rsv_<home shard>_<16 lowercase base32 chars>`` (80 random bits). The home shard is the shard of
the reservation's first SKU; its part there also stores the reservation document.
"""

from __future__ import annotations

import base64
import re
import secrets

_ID = re.compile(r"^rsv_(0|[1-9][0-9]{0,4})_([a-z2-7]{16})$")


def new_reservation_id(home_shard: int) -> str:
    token = base64.b32encode(secrets.token_bytes(10)).decode().lower()
    return f"rsv_{home_shard}_{token}"


def home_shard_of(reservation_id: str, shard_count: int) -> int | None:
    """The home shard named by a well-formed id, or None when the id is malformed for this deployment."""
    match = _ID.match(reservation_id)
    if match is None:
        return None
    shard = int(match.group(1))
    return shard if shard < shard_count else None
