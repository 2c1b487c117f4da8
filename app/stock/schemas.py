"""Request and response shapes of the stock domain (pydantic, no FastAPI).

Validation is strict on purpose: a quantity of "2", 2.5 or true is refused rather than coerced, unknown
fields are refused (a typo like ``safety_stok`` must not silently mean 0), and every bound named in the
design is enforced here before anything reaches Redis.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from app.stock.channels import ChannelState
from app.stock.policy import Buyer, Eligibility, HoldCooldown, Policy
from app.stock.presale import Presale, PresaleState, presale_free

SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SkuId = Annotated[str, StringConstraints(pattern=SKU_PATTERN)]
# Printable text without control characters; 128 is ample for UUIDs, emails and platform user ids.
UserId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
MAX_UNITS = 1_000_000_000  # keeps every counter far inside Lua's exact-integer range (2^53)


def available_units(
    on_hand: int,
    safety_stock: int,
    held: int,
    sold: int,
    backordered: int = 0,
    presale_cap: int = 0,
    presale_ends_ms: int = 0,
    now_ms: int = 0,
) -> int:
    """What a new hold may take: from stock on hand, then on backorder within an open presale
    (lua/includes/common.lua's available() is the same rule)."""
    on_hand_free = max(0, on_hand - safety_stock - (held + sold - backordered))
    return on_hand_free + presale_free(backordered, presale_cap, presale_ends_ms, now_ms)


def _once_each(names: list[str], what: str, advice: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name!r} appears twice; {advice}")
        seen.add(name)


class Mode(StrEnum):
    PRE_RESERVE = "pre_reserve"
    ON_ORDER = "on_order"
    ON_PAYMENT = "on_payment"


class ReservationStatus(StrEnum):
    HELD = "held"
    PENDING = "pending"
    CONFIRMED = "confirmed"
    RELEASED = "released"
    EXPIRED = "expired"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SkuSettings(Policy):
    """PUT /v1/skus/{sku}: the whole of a SKU's settings (a field left out takes its default, so a
    rule of the purchase policy left out is off)."""

    on_hand: int = Field(ge=0, le=MAX_UNITS)
    safety_stock: int = Field(default=0, ge=0, le=MAX_UNITS)
    mode: Mode = Field(default=Mode.PRE_RESERVE, strict=False)
    hold_ttl_seconds: int = Field(default=900, ge=1, le=86_400)
    per_user_limit: int | None = Field(default=None, ge=1, le=MAX_UNITS)
    presale: Presale | None = None


class Adjustment(_Strict):
    delta: int = Field(ge=-MAX_UNITS, le=MAX_UNITS)
    reason: str = Field(min_length=1, max_length=200)

    @field_validator("delta")
    @classmethod
    def _non_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("delta must not be 0")
        return value


class SplitSettings(_Strict):
    """PUT /v1/skus/{sku}/split: how many buckets the SKU's stock is spread over (1: not split)."""

    buckets: int = Field(ge=1, le=16)


class BucketState(BaseModel):
    """One bucket of a split SKU (app/stock/buckets.py)."""

    bucket: int
    shard: int
    on_hand: int
    held: int
    sold: int
    available: int
    routed: bool  # reservations are sent to it; a bucket past a lowered split is only drained


class SplitState(BaseModel):
    buckets: int  # reservations are routed over buckets 0..buckets-1
    per_bucket: list[BucketState]


class Receipt(_Strict):
    """POST /v1/skus/{sku}/receipts: goods that arrived, booked into on_hand and filling backorders."""

    quantity: int = Field(ge=1, le=MAX_UNITS)
    reason: str = Field(default="receipt", min_length=1, max_length=200)


class ReservationItem(_Strict):
    sku: SkuId
    quantity: int = Field(ge=1, le=1000)


class ListingItem(_Strict):
    """A reservation line naming a storefront listing: every component of the listing, `quantity` times."""

    listing: SkuId
    quantity: int = Field(ge=1, le=1000)


class ReservationRequest(_Strict):
    """SKU lines (`items`) and listing lines (`listings`), at least one line and at most 50 in all. A
    listing's components are added to the SKU lines before anything is reserved, a SKU named twice (by
    two listings, or by a listing and a line) counting once with the quantities summed."""

    user_id: UserId
    items: list[ReservationItem] = Field(default_factory=list, max_length=50)
    listings: list[ListingItem] = Field(default_factory=list, max_length=50)
    channel: Annotated[str, StringConstraints(pattern=SKU_PATTERN)] | None = None
    buyer: Buyer | None = None

    @field_validator("items")
    @classmethod
    def _distinct_skus(cls, items: list[ReservationItem]) -> list[ReservationItem]:
        _once_each([item.sku for item in items], "sku", "send one line per SKU")
        return items

    @field_validator("listings")
    @classmethod
    def _distinct_listings(cls, listings: list[ListingItem]) -> list[ListingItem]:
        _once_each([line.listing for line in listings], "listing", "send one line per listing")
        return listings

    @model_validator(mode="after")
    def _some_lines(self) -> ReservationRequest:
        if not 1 <= len(self.items) + len(self.listings) <= 50:
            raise ValueError("a reservation has 1 to 50 lines (items and listings together)")
        return self


class ListingComponent(_Strict):
    sku: SkuId
    quantity: int = Field(ge=1, le=1000)


class Listing(_Strict):
    """PUT /v1/listings/{listing}: the SKUs a storefront listing is made of, each a number of times."""

    components: list[ListingComponent] = Field(min_length=1, max_length=20)

    @field_validator("components")
    @classmethod
    def _distinct_components(cls, components: list[ListingComponent]) -> list[ListingComponent]:
        _once_each([c.sku for c in components], "sku", "give each component once, with its quantity")
        return components


class ListingState(Listing):
    listing: str


class SkuState(BaseModel):
    sku: str
    on_hand: int
    safety_stock: int
    held: int
    sold: int
    available: int
    mode: Mode
    hold_ttl_seconds: int
    per_user_limit: int | None
    max_per_order: int | None
    eligibility: Eligibility | None
    hold_cooldown: HoldCooldown | None
    backordered: int = 0  # units held or sold on backorder, not yet arrived (see presale)
    presale: PresaleState | None = None
    # `available` is what a reservation naming `channel` (null: none) may take; with channels that is
    # less than what all of them together may, `available_total`
    channel: str | None = None
    available_total: int = 0
    channels: list[ChannelState] = []
    # a split SKU's stock spread over buckets on several shards: the figures above are their sums
    split: SplitState | None = None


class ReceiptState(SkuState):
    """The SKU after a receipt, with what the receipt filled."""

    filled: int  # backordered units that became normal ones
    filled_lines: int  # reservation lines they belonged to, oldest first


class ReservationLine(BaseModel):
    sku: str
    quantity: int
    # units of the line promised on backorder and not yet arrived; the buyer is told `eta`
    backorder: bool = False
    backordered: int = 0
    eta: datetime | None = None


class Reservation(BaseModel):
    id: str
    status: ReservationStatus
    user_id: str
    items: list[ReservationLine]
    channel: str | None = None
    created_at: datetime
    expires_at: datetime | None


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
