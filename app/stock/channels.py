"""Sales channels sharing one SKU's stock: ring-fenced quotas, priorities, borrowing (pydantic, no FastAPI).

One back-end pool feeds several storefronts. ``PUT /v1/skus/{sku}/channels/{channel}`` gives a channel a
``quota`` of the SKU's stock on hand that only its reservations may take, a ``priority`` and whether it may
``borrow`` from the shared pool once its quota is used up.

- **Fences.** Stock on hand not yet promised is fenced for each channel up to what its quota has left
  (quota - used), channels in priority order (highest first, then by name). What no fence holds is the
  shared pool. When stock shrinks below every fence, the lowest priorities lose theirs first.
- **A reservation for a channel** (``"channel": "web"``) takes from its fence first, then, if the channel may
  borrow, from the shared pool and then on backorder (presale); a channel that may not borrow has its fence
  only. A reservation naming no channel, or a channel without a quota on the SKU, takes from the shared
  pool and then on backorder. Taking from the shared pool leaves every fence as it was, so no channel can
  eat into another's quota.
- **Used** counts the units a channel's reservations took from its quota, held or sold; releases and
  expiries give them back. A quota may not go below what is used (409 stock_conflict).

The rule is ``channel_view`` / ``split_line`` in lua/includes/channels.lua, where holds are granted;
``channel_states`` here mirrors it for GET /v1/skus/{sku}?channel=...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_CHANNELS = 20  # per SKU: the hot path reads them all (one HGETALL) when a SKU has any
MAX_QUOTA = 1_000_000_000  # schemas.MAX_UNITS
CHANNEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # as a SKU id: it is part of hash field names
ChannelId = Annotated[str, StringConstraints(pattern=CHANNEL_PATTERN)]


class ChannelSettings(BaseModel):
    """PUT /v1/skus/{sku}/channels/{channel}."""

    model_config = ConfigDict(extra="forbid", strict=True)

    quota: int = Field(ge=0, le=MAX_QUOTA)
    priority: int = Field(default=0, ge=0, le=1000)
    borrow: bool = True

    def script_args(self) -> list[int]:
        return [self.quota, self.priority, 1 if self.borrow else 0]


class ChannelState(BaseModel):
    channel: str
    quota: int
    used: int  # units its reservations took from the quota, held or sold
    priority: int
    borrow: bool
    fenced: int  # stock on hand held back for it now: its quota's rest, as far as stock and priority allow
    available: int  # what a reservation for this channel may take now (fence, shared pool, backorder)


def channel_states(raw: Mapping[str, str], free_on_hand: int, presale_free: int) -> tuple[int, list[ChannelState]]:
    """(the shared pool, each channel's state) from the SKU's channels hash (`q:<c>`, `u:<c>`, `p:<c>`,
    `b:<c>`), its stock on hand not yet promised and the presale's room."""
    fields: dict[str, dict[str, int]] = {}
    for field, value in raw.items():
        kind, _, name = field.partition(":")
        fields.setdefault(name, {"q": 0, "u": 0, "p": 0, "b": 0})[kind] = int(value)
    order = sorted(fields, key=lambda name: (-fields[name]["p"], name))
    rest, fences = free_on_hand, {}
    for name in order:
        fence = max(0, min(fields[name]["q"] - fields[name]["u"], rest))
        fences[name] = fence
        rest -= fence
    states = [
        ChannelState(
            channel=name,
            quota=f["q"],
            used=f["u"],
            priority=f["p"],
            borrow=f["b"] == 1,
            fenced=fences[name],
            available=fences[name] + (rest + presale_free if f["b"] == 1 else 0),
        )
        for name, f in sorted(fields.items())
    ]
    return rest, states
