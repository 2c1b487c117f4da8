"""Which webhook events one stock event causes: the one pure function of the rules, nothing else.

Every stock event carries ``av0`` and ``av``, the SKU's available units before and after the change
(presale allowance included), and ``bo``, its backordered units after; a line reserved on backorder also
carries ``lbo``, that line's backordered units (emit() in lua/includes/common.lua). The rules read those
fields only (and the SKU's low-stock threshold), so replaying a stream entry gives the same events with
the same ids, which is what makes the outbox's ``ON CONFLICT DO NOTHING`` enough to deliver each once:

- ``sold_out``: ``av0 > 0`` and ``av == 0``;
- ``back_in_stock``: ``av0 == 0`` and ``av > 0``;
- ``low_stock``: a threshold ``t`` is set and ``av0 > t >= av``: fires when availability crosses down into
  low stock, not again while it stays there (it fires again after it went back above ``t``);
- ``presale_opened``: a ``held`` line, or a ``sold`` one (a direct deduction at confirm: an ``on_payment``
  SKU, or a hold confirmed after its deadline), with ``lbo > 0`` and ``bo - lbo == 0``: the first
  backordered units. A ``confirmed`` hold's backorder was counted when it was held, so it opens nothing;
- ``reservation_expired``: an ``expired`` or ``lapsed`` line (``st == expired``). Its id is the
  reservation's, not the entry's, so a reservation expiring on several lines or shards is one event.

An event without ``av0``/``av`` (emitted before they existed) causes no stock transition.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from app.stock.events import StreamEvent

# The stock events that take units on backorder anew (a hold; a direct deduction at confirm).
OPENING_TYPES = frozenset({"held", "sold"})


class WebhookEventType(StrEnum):
    LOW_STOCK = "low_stock"
    SOLD_OUT = "sold_out"
    BACK_IN_STOCK = "back_in_stock"
    PRESALE_OPENED = "presale_opened"
    RESERVATION_EXPIRED = "reservation_expired"


EXPIRY_TYPES = frozenset({"expired", "lapsed"})


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One webhook event: ``body()`` is exactly what every subscribed endpoint receives."""

    id: str
    type: WebhookEventType
    tenant: str
    occurred_at_ms: int
    data: dict[str, Any]

    def body(self) -> dict[str, Any]:
        at = datetime.fromtimestamp(self.occurred_at_ms / 1000, tz=UTC)
        return {
            "id": self.id,
            "type": self.type.value,
            "created_at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "tenant": self.tenant,
            "data": self.data,
        }


def _int(fields: dict[str, str], name: str) -> int | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    return int(float(value))  # Lua may render a whole number as "5" or, rarely, "5.0"


def entry_event_id(shard: int, stream_id: str, kind: WebhookEventType) -> str:
    """A stock transition's id: its stream entry (unique per shard) and its type (one entry may cause two)."""
    return f"evt_{shard}_{stream_id}_{kind.value}"


def expiry_event_id(reservation_id: str) -> str:
    return f"evt_{reservation_id}_{WebhookEventType.RESERVATION_EXPIRED.value}"


def webhook_events(event: StreamEvent, low_stock_threshold: int | None = None) -> list[WebhookEvent]:
    """The webhook events one stock event causes (none for most). Pure: same input, same output."""
    f = event.fields
    tenant, kind, at = f.get("tenant", ""), f.get("type", ""), _int(f, "at") or event.position[0]
    out: list[WebhookEvent] = []

    def add(kind_: WebhookEventType, data: dict[str, Any], event_id: str | None = None) -> None:
        event_id = event_id or entry_event_id(event.shard, event.event_id, kind_)
        out.append(WebhookEvent(event_id, kind_, tenant, at, data))

    av0, av, bo = _int(f, "av0"), _int(f, "av"), _int(f, "bo")
    if av0 is not None and av is not None:
        stock = {
            "sku": f.get("sku"),
            "available": av,
            "available_before": av0,
            "backordered": bo or 0,
            "on_hand": _int(f, "on_hand"),
            "held": _int(f, "held"),
            "sold": _int(f, "sold"),
            "cause": kind,  # the stock event: held, released, expired, adjusted, sku_set, ...
            "reservation_id": f.get("res") or None,
        }
        if av0 > 0 and av == 0:
            add(WebhookEventType.SOLD_OUT, stock)
        if av0 == 0 and av > 0:
            add(WebhookEventType.BACK_IN_STOCK, stock)
        t = low_stock_threshold
        if t is not None and av0 > t >= av:
            add(WebhookEventType.LOW_STOCK, {**stock, "low_stock_threshold": t})
    lbo = _int(f, "lbo")
    if kind in OPENING_TYPES and lbo is not None and bo is not None and lbo > 0 and bo - lbo == 0:
        data = {"sku": f.get("sku"), "reservation_id": f.get("res") or None, "backordered": bo}
        add(WebhookEventType.PRESALE_OPENED, data)
    reservation = f.get("res")
    if kind in EXPIRY_TYPES and f.get("st") == "expired" and reservation:
        data = {"reservation_id": reservation, "user_id": f.get("user") or None}
        add(WebhookEventType.RESERVATION_EXPIRED, data, expiry_event_id(reservation))
    return out


def low_stock_candidate(event: StreamEvent) -> bool:
    """Whether the event lowered availability, so its SKU's threshold is worth looking up."""
    av0, av = _int(event.fields, "av0"), _int(event.fields, "av")
    return av0 is not None and av is not None and av < av0
