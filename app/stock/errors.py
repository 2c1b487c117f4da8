"""Domain errors. Each carries a stable machine ``code`` that the API puts in its problem document;
the API layer maps classes to HTTP statuses, the domain knows nothing of HTTP."""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ScriptCode(IntEnum):
    """Negative status codes returned by the Lua scripts (first element of the reply)."""

    SKU_NOT_FOUND = -1
    INSUFFICIENT_STOCK = -2
    LIMIT_EXCEEDED = -3
    STOCK_CONFLICT = -4
    RESERVATION_NOT_FOUND = -5
    RESERVATION_RELEASED = -6
    RESERVATION_CONFIRMED = -7
    IDEMPOTENCY_CONFLICT = -8
    DUPLICATE_LINE = -9  # a caller bug (the API refuses duplicated SKUs): surfaces as an unexpected reply
    NOT_READY = -10  # the shard has no ready marker: Redis lost its data and it awaits a rebuild
    NOT_ELIGIBLE = -11  # the buyer fails one of the SKU's eligibility rules
    HOLD_COOLDOWN = -12  # the user's holds on the SKU lapsed too often of late
    ORDER_LIMIT = -13  # a line asks for more than the SKU's max_per_order
    STALE = -14  # a receipt named reservations that no longer head the backorder queue: read it again
    TOO_MANY_CHANNELS = -15  # a SKU has as many channels as it may


class StockError(Exception):
    code = "stock_error"
    title = "Stock error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class SkuNotFound(StockError):
    code = "sku_not_found"
    title = "SKU not found"


class InsufficientStock(StockError):
    """`items`: each short line's sku, requested and available (to it: its channel's fence, the shared pool,
    backorder). `totals`: per SKU, what anyone at all could take, every fence included (not shown: it is
    what the sold-out fast path learns from, a channel's used-up quota not being the SKU sold out)."""

    code = "insufficient_stock"
    title = "Insufficient stock"

    def __init__(self, detail: str, totals: dict[str, int] | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.totals = totals if totals is not None else {i["sku"]: i["available"] for i in extra.get("items", [])}


class LimitExceeded(StockError):
    code = "limit_exceeded"
    title = "Per-user limit exceeded"


class NotEligible(StockError):
    code = "not_eligible"
    title = "Buyer not eligible"


class RetryLater(StockError):
    """A refusal that lifts by itself after ``retry_after`` seconds (answered 429 with Retry-After)."""

    def __init__(self, detail: str, retry_after: int, **extra: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **extra)
        self.retry_after = retry_after


class HoldCooldown(RetryLater):
    """The user's holds on this SKU lapsed too often of late: no new hold before the cooldown ends."""

    code = "hold_cooldown"
    title = "Hold cooldown"


class RateLimited(RetryLater):
    code = "rate_limited"
    title = "Too many requests"


class StockConflict(StockError):
    code = "stock_conflict"
    title = "Stock conflict"


class TooManyChannels(StockError):
    code = "too_many_channels"
    title = "Too many channels"


class SplitConflict(StockError):
    """A split SKU (app/stock/buckets.py) and a feature that needs its stock in one place (a per-user
    limit, a presale, channels), or a split the deployment cannot place (more buckets than shards)."""

    code = "split_conflict"
    title = "Split conflict"


class ListingNotFound(StockError):
    code = "listing_not_found"
    title = "Listing not found"


class ReservationTooLarge(StockError):
    """Listing lines expanded into more SKU lines, or larger ones, than a reservation may have."""

    code = "reservation_too_large"
    title = "Reservation too large"


class ReservationNotFound(StockError):
    code = "reservation_not_found"
    title = "Reservation not found"


class ReservationReleased(StockError):
    code = "reservation_released"
    title = "Reservation released"


class ReservationConfirmed(StockError):
    code = "reservation_confirmed"
    title = "Reservation confirmed"


class IdempotencyConflict(StockError):
    code = "idempotency_conflict"
    title = "Idempotency-Key reused with another request"


class ReservationBusy(StockError):
    code = "reservation_busy"
    title = "Reservation busy"


class NotReady(StockError):
    code = "not_ready"
    title = "Service not ready"

    @classmethod
    def for_shard(cls, shard: int) -> NotReady:
        return cls(
            f"shard {shard} of the stock store lost its data and awaits a rebuild from PostgreSQL; retry shortly",
            shard=shard,
        )


class LedgerUnavailable(StockError):
    """A confirmation could not be written to PostgreSQL, so it was not made (or not yet acknowledged)."""

    code = "ledger_unavailable"
    title = "System of record unavailable"
