"""Presale / backorder (负卖): selling incoming stock before it arrives, within a cap (pydantic, no FastAPI).

A SKU's ``presale: {cap, eta, ends_at?}`` lets reservations go on once stock on hand is gone: a held line
takes what on hand cannot cover *on backorder*, as long as the SKU's backordered units stay within
``cap`` and the presale has not ended. ``cap`` bounds the units promised and not yet arrived at any one
moment; a receipt (``POST /v1/skus/{sku}/receipts``) books arrived goods into on_hand and fills the
backorders with them, oldest first, which frees that much of the cap again. To stop selling ahead once
the shipment is in, end the presale (``ends_at``) or lower the cap; lowering it below what is already
backordered is refused (409 stock_conflict), as is removing it while units are backordered.

The rule lives in three places kept in step by the tests: ``available()`` in lua/includes/common.lua
(where holds are granted), ``available_units`` here (what the API reports), and the rebuild's check of
invariant 1 (app/recovery/image.py): ``held + sold - backordered <= on_hand - safety_stock`` and
``backordered <= cap``.

Like the purchase policy, the presale travels as flat integer fields (PRESALE_FIELDS: cap, ETA and end
in ms since the epoch, 0 = none) in the SKU's hash and on the ``sku_set`` event, and as the JSON object
``sku.presale`` in PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_CAP = 1_000_000_000  # schemas.MAX_UNITS: every counter stays far inside Lua's exact integers

# The flat fields after the counters and the policy, in the order the scripts answer them.
PRESALE_FIELDS = ("presale_cap", "presale_eta", "presale_ends_at")


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class Presale(BaseModel):
    """PUT /v1/skus/{sku}'s ``presale``: up to ``cap`` units may be promised on backorder at once, with
    ``eta`` told to the buyer; from ``ends_at`` on (if given) nothing new is granted on backorder."""

    model_config = ConfigDict(extra="forbid")

    cap: int = Field(ge=1, le=MAX_CAP, strict=True)
    eta: datetime
    ends_at: datetime | None = None

    @model_validator(mode="after")
    def _aware(self) -> Presale:
        for name in ("eta", "ends_at"):
            moment = getattr(self, name)
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"{name} needs a time zone (for example 2027-01-15T09:00:00Z)")
        return self

    def script_args(self) -> list[int]:
        """set_sku-4.lua's ARGV[18..20]."""
        return [self.cap, to_ms(self.eta), to_ms(self.ends_at) if self.ends_at else 0]


NO_PRESALE_ARGS = [0, 0, 0]


class PresaleState(BaseModel):
    """A SKU's presale as GET /v1/skus/{sku} answers it."""

    cap: int
    eta: datetime
    ends_at: datetime | None
    backordered: int  # units promised on backorder, not yet arrived
    open: bool  # whether new units may be granted on backorder now (cap > 0 and before ends_at)
    available: int  # units a new hold may still take on backorder


def presale_free(backordered: int, cap: int, ends_ms: int, now_ms: int) -> int:
    """Units a new hold may take on backorder (presale_free() in lua/includes/common.lua)."""
    if cap <= 0 or (ends_ms > 0 and now_ms >= ends_ms):
        return 0
    return max(0, cap - backordered)


def presale_state(values: Mapping[str, Any] | Sequence[Any], backordered: int, now_ms: int) -> PresaleState | None:
    """The presale from its flat fields (a mapping, or values in PRESALE_FIELDS order; missing = 0,
    as on a SKU from before presales); None when the SKU has none."""
    if not isinstance(values, Mapping):
        values = dict(zip(PRESALE_FIELDS, values, strict=True))
    cap, eta, ends = (int(values.get(f) or 0) for f in PRESALE_FIELDS)
    if cap <= 0:
        return None
    free = presale_free(backordered, cap, ends, now_ms)
    return PresaleState(
        cap=cap,
        eta=from_ms(eta),
        ends_at=from_ms(ends) if ends else None,
        backordered=backordered,
        open=not (ends > 0 and now_ms >= ends),
        available=free,
    )
