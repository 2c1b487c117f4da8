"""What each response may be. Pure functions of status, content type and body, so they are tested without
Locust and the users only decide which answers their situation allows.

An answer the situation allows is a success for Locust even when it is a refusal (409 insufficient_stock
is the normal fate of most flash-sale buyers); anything else — a 5xx, a status or problem code the
situation does not allow, a body that is not JSON or lacks a field, a reservation in the wrong state, a
SKU read showing more held + sold than stock — is a failure with a reason saying what was wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RESERVATION_ID = re.compile(r"^rsv_[0-9]{1,5}_[a-z2-7]{16}$")
PROBLEM_FIELDS = ("type", "title", "status", "detail", "code")
SKU_FIELDS = {
    "sku": str,
    "on_hand": int,
    "safety_stock": int,
    "held": int,
    "sold": int,
    "available": int,
    "mode": str,
    "hold_ttl_seconds": int,
}
RESERVATION_FIELDS = {"id": str, "status": str, "user_id": str, "items": list, "created_at": str}

# HTTP status -> problem codes allowed with it (None: a success, whose body the caller checks)
Expected = Mapping[int, frozenset[str] | None]


@dataclass(frozen=True)
class Answer:
    """One response as judged: `label` names the outcome for the counts ("201", "409 limit_exceeded",
    "0 connection error"); `error` is set when the situation did not allow it."""

    status: int
    label: str
    body: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def code(self) -> str | None:
        """The problem code of a refusal (None for a success or an undecodable body)."""
        if isinstance(self.body, dict) and self.status >= 400:
            code = self.body.get("code")
            return code if isinstance(code, str) else None
        return None


def judge(
    status: int, content_type: str | None, text: bytes | str | None, expected: Expected, transport_error: str = ""
) -> Answer:
    """Status and body against what the situation allows; success bodies still need their own check.
    Status 0 is no answer at all; `transport_error` then says why (timeout, reset, refused)."""
    if status == 0:
        return Answer(0, "0 no answer", error=f"no answer: {transport_error or 'connection error'}")
    try:
        body = json.loads(text or "")
    except ValueError:
        shown = repr(text)[:120]
        return Answer(status, f"{status} not json", error=f"HTTP {status} with a body that is not JSON: {shown}")
    if status < 400:
        label = str(status)
        if status not in expected:
            return Answer(status, label, body, f"HTTP {status} where {_allowed(expected)} was expected")
        if not isinstance(body, dict):
            return Answer(status, label, body, f"HTTP {status} body is not a JSON object")
        return Answer(status, label, body)
    problem_error = _problem_shape(status, content_type, body)
    code = body.get("code") if isinstance(body, dict) else None
    label = f"{status} {code}" if isinstance(code, str) else f"{status} (no code)"
    if problem_error:
        return Answer(status, label, body, problem_error)
    allowed = expected.get(status)
    if allowed is None or code not in allowed:
        return Answer(status, label, body, f"{label} where {_allowed(expected)} was expected")
    if code == "insufficient_stock":
        return Answer(status, label, body, _insufficient_stock_items(body))
    return Answer(status, label, body)


def _allowed(expected: Expected) -> str:
    parts = [str(s) if codes is None else f"{s} {'/'.join(sorted(codes))}" for s, codes in sorted(expected.items())]
    return " or ".join(parts)


def _problem_shape(status: int, content_type: str | None, body: Any) -> str | None:
    if not (content_type or "").startswith("application/problem+json"):
        return f"HTTP {status} with content type {content_type!r}, not application/problem+json"
    if not isinstance(body, dict):
        return f"HTTP {status} problem document is not a JSON object"
    missing = [f for f in PROBLEM_FIELDS if f not in body]
    if missing:
        return f"HTTP {status} problem document lacks {', '.join(missing)}"
    if body["status"] != status:
        return f"problem document says status {body['status']!r} on an HTTP {status}"
    return None


def _insufficient_stock_items(body: dict[str, Any]) -> str | None:
    items = body.get("items")
    if not isinstance(items, list) or not items:
        return "insufficient_stock without its per-item list"
    for item in items:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), int) for k in ("requested", "available")):
            return f"insufficient_stock item malformed: {item!r:.120}"
        if item["available"] < 0:
            return f"insufficient_stock reports negative availability: {item!r:.120}"
    return None


def _typed(body: dict[str, Any], fields: Mapping[str, type]) -> str | None:
    for name, kind in fields.items():
        value = body.get(name)
        # bool is an int in Python; a JSON true where a count belongs is malformed all the same
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"field {name!r} is {value!r:.60}, expected {kind.__name__}"
    return None


def reservation_error(
    body: dict[str, Any],
    statuses: frozenset[str],
    *,
    reservation_id: str | None = None,
    user_id: str | None = None,
    items: list[dict[str, Any]] | None = None,
    needs_deadline: bool = False,
) -> str | None:
    """What is wrong with a reservation document, if anything."""
    wrong = _typed(body, RESERVATION_FIELDS)
    if wrong:
        return f"reservation {wrong}"
    if not RESERVATION_ID.match(body["id"]):
        return f"reservation id {body['id']!r} malformed"
    if reservation_id is not None and body["id"] != reservation_id:
        return f"answered reservation {body['id']} for {reservation_id}"
    if body["status"] not in statuses:
        return f"reservation {body['id']} is {body['status']!r}, expected {'/'.join(sorted(statuses))}"
    if user_id is not None and body["user_id"] != user_id:
        return f"reservation {body['id']} belongs to {body['user_id']!r}, not {user_id!r}"
    # each item is the SKU and quantity asked, plus whether it is on backorder (the scenarios sell no presale)
    if items is not None and [{"sku": i.get("sku"), "quantity": i.get("quantity")} for i in body["items"]] != items:
        return f"reservation {body['id']} items {body['items']!r:.120} differ from those asked"
    if items is not None and any(i.get("backorder") is not False for i in body["items"]):
        return f"reservation {body['id']} items {body['items']!r:.120} on backorder, with no presale on sale"
    if needs_deadline and not isinstance(body.get("expires_at"), str):
        return f"pre_reserve hold {body['id']} without expires_at"
    return None


def sku_state_error(body: dict[str, Any], sku: str) -> str | None:
    """What is wrong with a SKU state, invariant 1 included: a read showing an oversell is a failure."""
    wrong = _typed(body, SKU_FIELDS)
    if wrong:
        return f"sku state {wrong}"
    if body["sku"] != sku:
        return f"asked for {sku}, answered {body['sku']}"
    cap = body["on_hand"] - body["safety_stock"]
    if body["held"] + body["sold"] > cap:
        return f"OVERSELL seen: {sku} held {body['held']} + sold {body['sold']} > on_hand - safety_stock {cap}"
    if body["available"] != cap - body["held"] - body["sold"]:
        return f"{sku} available {body['available']} != on_hand - safety_stock - held - sold"
    if min(body["held"], body["sold"], body["available"]) < 0:
        return f"{sku} has a negative counter: {body!r:.160}"
    return None


# Which fact of the `buyer` each eligibility rule reads (the service's app/stock/policy.py; repeated here so
# a run against a given URL needs none of the service's code).
RULE_FACTS = {
    "min_account_age_days": "account_age_days",
    "min_orders": "orders_count",
    "min_member_days": "member_days",
}


def ineligible(rules: dict[str, int] | None, buyer: dict[str, int]) -> str | None:
    """The first rule `buyer` fails, or None."""
    for rule, minimum in (rules or {}).items():
        if buyer.get(RULE_FACTS[rule], 0) < minimum:
            return f"{rule} {minimum} with {RULE_FACTS[rule]} {buyer.get(RULE_FACTS[rule], 0)}"
    return None
