"""What the users accept as an answer (loadtests/checks.py), and how a scenario takes overrides: a load
test whose checks let a wrong answer pass proves nothing, so each kind of wrong answer is tried here."""

from __future__ import annotations

import json

import pytest

from loadtests.checks import Expected, ineligible, judge, reservation_error, sku_state_error
from loadtests.scenarios import SCENARIOS, Run, parse_setting, with_overrides

PROBLEM = "application/problem+json"
RESERVE: Expected = {201: None, 409: frozenset({"insufficient_stock", "limit_exceeded"})}


def problem(status: int, code: str, **extra: object) -> bytes:
    doc = {"type": f"urn:x:{code}", "title": code, "status": status, "detail": code, "code": code, **extra}
    return json.dumps(doc).encode()


def test_expected_refusals_are_successes() -> None:
    short = problem(409, "insufficient_stock", items=[{"sku": "a", "requested": 1, "available": 0}])
    answer = judge(409, PROBLEM, short, RESERVE)
    assert answer.ok and answer.label == "409 insufficient_stock" and answer.code == "insufficient_stock"
    assert judge(409, PROBLEM, problem(409, "limit_exceeded"), RESERVE).ok
    assert judge(201, "application/json", b'{"id": "x"}', RESERVE).ok


@pytest.mark.parametrize(
    ("status", "content_type", "body", "reason"),
    [
        (500, "text/plain", b"Internal Server Error", "not JSON"),
        (503, PROBLEM, problem(503, "not_ready"), "503 not_ready where"),
        (409, PROBLEM, problem(409, "reservation_released"), "409 reservation_released where"),
        (409, "application/json", problem(409, "insufficient_stock"), "not application/problem+json"),
        (409, PROBLEM, b'{"code": "insufficient_stock", "status": 409}', "lacks type, title, detail"),
        (409, PROBLEM, problem(409, "insufficient_stock"), "without its per-item list"),
        (409, PROBLEM, problem(422, "insufficient_stock"), "says status 422 on an HTTP 409"),
        (200, "application/json", b"{}", "HTTP 200 where 201"),
        (201, "application/json", b"[1]", "not a JSON object"),
        (0, None, None, "no answer: timeout"),
    ],
)
def test_unexpected_answers_are_failures(
    status: int, content_type: str | None, body: bytes | None, reason: str
) -> None:
    answer = judge(status, content_type, body, RESERVE, "timeout" if status == 0 else "")
    assert not answer.ok
    assert answer.error is not None and reason in answer.error


def test_a_reservation_in_the_wrong_state_or_shape_is_caught() -> None:
    doc = {"id": "rsv_3_abcdefghijklmnop", "status": "held", "user_id": "u", "items": [], "created_at": "t"}
    assert reservation_error(doc, frozenset({"held"}), user_id="u", items=[]) is None
    assert "expected confirmed" in (reservation_error(doc, frozenset({"confirmed"})) or "")
    assert "belongs to" in (reservation_error(doc, frozenset({"held"}), user_id="v") or "")
    assert "malformed" in (reservation_error({**doc, "id": "rsv_x"}, frozenset({"held"})) or "")
    assert "without expires_at" in (reservation_error(doc, frozenset({"held"}), needs_deadline=True) or "")


def test_a_sku_read_showing_an_oversell_is_caught() -> None:
    state = {"sku": "a", "on_hand": 10, "safety_stock": 2, "held": 3, "sold": 5, "available": 0}
    state |= {"mode": "pre_reserve", "hold_ttl_seconds": 9}
    assert sku_state_error(state, "a") is None
    assert "OVERSELL" in (sku_state_error({**state, "sold": 6, "available": -1}, "a") or "")
    assert "available" in (sku_state_error({**state, "available": 1}, "a") or "")
    assert "expected int" in (sku_state_error({**state, "held": True}, "a") or "")


def test_overrides_reach_nested_settings_and_survive_the_trip_to_locust() -> None:
    scenario = with_overrides(SCENARIOS["flash-100"], dict([parse_setting("scalper.pay_p=1"), ("users", 1500)]))
    assert (scenario.users, scenario.scalper.pay_p, scenario.buyer.think_s) == (1500, 1, (1.0, 5.0))
    run = Run(scenario, "r1", ["flash-100-r1"], "/tmp/x")
    assert Run.from_json(run.to_json()) == run  # tuples come back as tuples
    assert scenario.user_classes() == ["Buyer", "Scalper"]
    assert SCENARIOS["steady-checkout"].user_classes() == ["Buyer", "Scalper", "Browser", "Merchant"]
    with pytest.raises(ValueError, match="unknown scenario setting"):
        with_overrides(scenario, {"scalper.payp": 1})


def test_an_account_is_ineligible_by_the_first_rule_it_fails() -> None:
    rules = {"min_account_age_days": 30, "min_orders": 1}
    assert ineligible(rules, {"account_age_days": 30, "orders_count": 1, "member_days": 0}) is None
    assert (
        ineligible(rules, {"account_age_days": 29, "orders_count": 5})
        == "min_account_age_days 30 with account_age_days 29"
    )
    assert ineligible(rules, {"account_age_days": 400, "orders_count": 0}) == "min_orders 1 with orders_count 0"
    assert ineligible(None, {"account_age_days": 0}) is None
