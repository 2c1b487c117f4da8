"""Stock events as they travel from a shard stream to the ledger, and what each type does.

The Lua scripts XADD the events (see emit() in lua/includes/common.lua for their fields); the worker and
confirm's write-through persist them; rebuild, reconcile and the tests read them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class StreamEvent:
    shard: int
    event_id: str  # the stream entry id, "<ms>-<seq>": unique and ordered within its shard stream
    fields: dict[str, str]
    # (ms, seq): the id's order as numbers, worked out once (the worker sorts and compares by it)
    position: tuple[int, int] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        ms, seq = self.event_id.split("-")
        object.__setattr__(self, "position", (int(ms), int(seq)))


def parse_entries(shard: int, entries: Sequence[Any]) -> list[StreamEvent]:
    """Stream entries as redis-py returns them (XRANGE, XREADGROUP, XAUTOCLAIM) -> events; entries
    deleted meanwhile (empty fields) are skipped."""
    return [StreamEvent(shard, str(entry_id), dict(fields)) for entry_id, fields in entries if fields]


# What each event type does to (on_hand, held, sold, the user's units) per unit of `qty`: the table
# beside emit() in lua/includes/common.lua. sku_set is absolute (on_hand := on_hand) and listed apart.
EFFECTS: dict[str, tuple[int, int, int, int]] = {
    "adjusted": (1, 0, 0, 0),
    "received": (1, 0, 0, 0),
    "filled": (0, 0, 0, 0),  # moves units from backordered to normal: `bo` on the event says how many are left
    "channel_set": (0, 0, 0, 0),  # a channel's quota, priority or borrowing set: no unit moves
    "held": (0, 1, 0, 1),
    "pending": (0, 0, 0, 0),
    "confirmed": (0, -1, 1, 0),
    "sold": (0, 0, 1, 1),
    "released": (0, -1, 0, -1),
    "expired": (0, -1, 0, -1),
    "undone": (0, -1, 0, -1),
    "cancelled": (0, 0, 0, 0),
    "lapsed": (0, 0, 0, 0),
    "unconfirmed": (0, 1, -1, 0),
    "unsold": (0, 0, -1, -1),
}
RESERVE_TYPES = frozenset({"held", "pending"})


@dataclass(frozen=True, slots=True)
class ReservationRecord:
    """A reservation's document as the system of record keeps it."""

    id: str
    tenant: str
    user_id: str
    items: list[dict[str, Any]]
    channel: str | None
    created_at_ms: int
    expires_at_ms: int


class SaleLedger(Protocol):
    """Where confirmations are written through before `confirm` answers (PostgreSQL in production)."""

    async def record_confirmation(self, events: Sequence[StreamEvent], reservation: ReservationRecord) -> None:
        """Persists the events (idempotently) with the reservation's document. Raises
        app.stock.errors.LedgerUnavailable when they could not be made durable."""
        ...
