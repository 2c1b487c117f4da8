"""The transition rules, as a pure function of one stock event's fields (app/webhooks/rules.py)."""

from __future__ import annotations

from typing import Any

import pytest

from app.stock.events import StreamEvent
from app.webhooks.rules import WebhookEventType as T
from app.webhooks.rules import webhook_events


def event(kind: str = "held", shard: int = 3, entry: str = "1700000000000-0", **fields: Any) -> StreamEvent:
    base = {"type": kind, "tenant": "acme", "sku": "tea", "qty": "1", "res": "rsv_3_aaaaaaaaaaaaaaaa", "user": "u1"}
    base |= {"on_hand": "10", "held": "1", "sold": "0", "at": "1700000000000"}
    return StreamEvent(shard, entry, base | {k: str(v) for k, v in fields.items()})


def types(e: StreamEvent, threshold: int | None = None) -> list[T]:
    return [w.type for w in webhook_events(e, threshold)]


@pytest.mark.parametrize(
    ("av0", "av", "expected"),
    [
        (1, 0, [T.SOLD_OUT]),
        (5, 0, [T.SOLD_OUT]),
        (0, 0, []),
        (2, 1, []),
        (0, 1, [T.BACK_IN_STOCK]),
        (0, 9, [T.BACK_IN_STOCK]),
    ],
)
def test_sold_out_and_back_in_stock_fire_on_crossing_zero(av0: int, av: int, expected: list[T]) -> None:
    assert types(event(av0=av0, av=av, bo=0)) == expected


@pytest.mark.parametrize(
    ("av0", "av", "fires"),
    [
        (6, 5, True),  # crosses down into low stock: av0 > t >= av
        (6, 2, True),  # crosses down by more than one unit
        (5, 4, False),  # already low: not repeated
        (5, 5, False),
        (9, 6, False),  # still above the threshold
        (4, 6, False),  # going up never fires it
        (5, 6, False),
    ],
)
def test_low_stock_fires_when_crossing_down_into_the_threshold(av0: int, av: int, fires: bool) -> None:
    assert (T.LOW_STOCK in types(event(av0=av0, av=av, bo=0), threshold=5)) is fires


def test_low_stock_needs_a_threshold_and_can_come_with_sold_out() -> None:
    assert types(event(av0=6, av=5, bo=0)) == []
    both = webhook_events(event(av0=3, av=0, bo=0), 2)
    assert [w.type for w in both] == [T.SOLD_OUT, T.LOW_STOCK]
    assert len({w.id for w in both}) == 2  # one entry, two events: two ids
    assert both[1].data["low_stock_threshold"] == 2 and both[1].data["available"] == 0


@pytest.mark.parametrize(
    ("kind", "lbo", "bo", "fires"),
    [
        ("held", 2, 2, True),  # the first backordered units of the SKU: presale opened
        ("held", 1, 3, False),  # others were backordered before
        ("held", 0, 0, False),  # a line fully from on-hand stock
        ("sold", 2, 2, True),  # a direct deduction at confirm (on_payment) takes units on backorder too
        ("sold", 1, 3, False),
        ("confirmed", 2, 2, False),  # a hold confirmed: its backorder was counted (and opened) when held
        ("released", 2, 2, False),
    ],
)
def test_presale_opened_on_the_first_backordered_units(kind: str, lbo: int, bo: int, fires: bool) -> None:
    assert (T.PRESALE_OPENED in types(event(kind, av0=0, av=0, bo=bo, lbo=lbo))) is fires


def test_a_line_without_lbo_is_no_presale() -> None:
    assert T.PRESALE_OPENED not in types(event("held", av0=0, av=0, bo=3))


@pytest.mark.parametrize("kind", ["expired", "lapsed"])
def test_reservation_expired_is_one_event_per_reservation(kind: str) -> None:
    # two lines of one reservation, on two shards: the same event id, so the outbox keeps one
    a = webhook_events(event(kind, shard=1, entry="1-0", st="expired", sku="tea", av0=0, av=1, bo=0))
    b = webhook_events(event(kind, shard=9, entry="2-0", st="expired", sku="cup", av0=0, av=1, bo=0))
    ea = [w for w in a if w.type is T.RESERVATION_EXPIRED]
    eb = [w for w in b if w.type is T.RESERVATION_EXPIRED]
    assert len(ea) == len(eb) == 1 and ea[0].id == eb[0].id
    assert ea[0].data == {"reservation_id": "rsv_3_aaaaaaaaaaaaaaaa", "user_id": "u1"}


def test_a_released_reservation_is_not_expired() -> None:
    assert types(event("released", st="released", av0=1, av=2, bo=0)) == []


def test_ids_are_deterministic_per_entry_and_differ_between_entries() -> None:
    first = webhook_events(event(av0=1, av=0, bo=0))
    again = webhook_events(event(av0=1, av=0, bo=0))
    other = webhook_events(event(entry="1700000000000-1", av0=1, av=0, bo=0))
    other_shard = webhook_events(event(shard=4, av0=1, av=0, bo=0))
    assert first == again
    assert first[0].body() == again[0].body()
    assert len({first[0].id, other[0].id, other_shard[0].id}) == 3


def test_events_without_availability_fields_cause_no_stock_transition() -> None:
    assert types(event("held")) == []
    assert types(event("adjusted", res="")) == []


def test_the_body_names_the_event_and_its_stock() -> None:
    (sold_out,) = webhook_events(event(av0=1, av=0, bo=2))
    body = sold_out.body()
    assert body["id"] == sold_out.id and body["type"] == "sold_out" and body["tenant"] == "acme"
    assert body["created_at"] == "2023-11-14T22:13:20.000Z"
    assert body["data"]["sku"] == "tea" and body["data"]["available"] == 0 and body["data"]["available_before"] == 1
    assert body["data"]["backordered"] == 2 and body["data"]["cause"] == "held"
