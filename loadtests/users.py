"""The simulated people: real buyers, scalpers, browsers, and a merchant restocking.

Each user lives one journey (a flash sale's crowd arrives once) or journey after journey (steady
traffic), as the scenario says. Users never stop themselves: Locust would spawn replacements during the
ramp-up to keep its user count, so a user whose journey is over parks until the test stops, its
connections closed. The locustfile's monitor ends the test once every journey is over.

Every response goes through checks.judge with the answers the user's situation allows; refusals the
situation allows are successes for Locust, the rest are failures with their reason, and both are counted
by outcome for the audit.
"""

from __future__ import annotations

import itertools
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import gevent
from gevent.event import Event
from geventhttpclient.response import HTTPConnectionClosed
from locust import task
from locust.contrib.fasthttp import FastHttpUser
from locust.exception import StopUser

from loadtests.checks import Answer, Expected, ineligible, judge, reservation_error, sku_state_error
from loadtests.outcomes import Outcomes, Sale
from loadtests.scenarios import Run, Scenario

CREATED: Expected = {201: None, 409: frozenset({"insufficient_stock", "limit_exceeded"})}
CREATED_UNDER_RULES: Expected = {**CREATED, 403: frozenset({"not_eligible"})}  # the SKU has eligibility rules
# Paying a live hold: 200; had it expired meanwhile (slow payer, slow answer), 409 if the stock is gone.
PAID: Expected = {200: None, 409: frozenset({"insufficient_stock"})}
PAID_AFTER_RELEASE: Expected = {409: frozenset({"reservation_released"})}
RELEASED: Expected = {200: None}
READ: Expected = {200: None}
# 503s are failures, yet a payment is retried as the README asks: nothing changed, try again.
RETRIED_CODES = frozenset({"ledger_unavailable", "not_ready"})
CONFIRM_TRIES = 3
# How a request on a connection the service closed meanwhile fails (the reset, when it comes mid-send).
CLOSED_CONNECTION = (HTTPConnectionClosed, ConnectionResetError, BrokenPipeError)
IDLE_CLOSE_S = 2.0  # pauses longer than this start again on a fresh connection (see StockholdUser.pause)


def account_facts(new: bool) -> dict[str, int]:
    """What a checkout knows of an account (the reservation's `buyer`): one opened within the week with
    no order yet, or an established one."""
    if new:
        return {"account_age_days": random.randint(0, 7), "orders_count": 0, "member_days": random.randint(0, 7)}
    return {
        "account_age_days": random.randint(60, 3650),
        "orders_count": random.randint(1, 300),
        "member_days": random.randint(30, 2000),
    }


class _StaleConnection(Exception):
    """A request failed on a keep-alive connection the service had closed: send it again."""


@dataclass
class Shared:
    """State every user of the one Locust process shares (the process is single, so no locks)."""

    run: Run
    outcomes: Outcomes = field(default_factory=Outcomes)
    # Set when the sale is over (sold out) or the test stops: users take no further step but their
    # first reserve, so late arrivals still meet the sold-out answer.
    halt: Event = field(default_factory=Event)
    stopping: Event = field(default_factory=Event)  # the test is stopping: parked users leave
    finished: int = 0  # one-journey users whose journey is over


@dataclass(frozen=True)
class Hold:
    reservation_id: str
    user_id: str
    items: list[dict[str, Any]]
    expires_at: float | None  # epoch seconds

    def sale(self) -> Sale:
        return Sale(self.reservation_id, self.user_id, self.items)


class StockholdUser(FastHttpUser):
    abstract = True
    shared: ClassVar[Shared]  # set by the locustfile before any user starts
    kind: ClassVar[str] = "user"
    # Past this an answer is an unknown outcome; stays well inside any scenario's run time.
    network_timeout = 30.0
    connection_timeout = 30.0
    _numbers: ClassVar[dict[str, itertools.count[int]]] = {}
    _arrivals: ClassVar[itertools.count[int]] = itertools.count()

    def __init__(self, environment: Any) -> None:
        hosts = self.shared.run.hosts
        if hosts:  # before FastHttpUser builds its client on self.host: this user's replica, in turn
            self.host = hosts[next(self._arrivals) % len(hosts)]
        super().__init__(environment)
        self.number = next(self._numbers.setdefault(self.kind, itertools.count(1)))

    @property
    def scenario(self) -> Scenario:
        return self.shared.run.scenario

    def pause(self, seconds: float) -> bool:
        """Sleeps; True if the sale ended or the test stopped meanwhile (the caller then stops)."""
        if seconds > IDLE_CLOSE_S and self.client_pool is None:
            # A person coming back after a while connects anew, as a browser would; and a server that
            # drops idle keep-alive connections (uvicorn's default: 5 s; stockhold keeps them 75 s) would
            # otherwise only be found to have done so by sending on a closed socket. (Requests in flight
            # on other greenlets of this user keep their socket.)
            self.client.client.close()
        return bool(self.shared.halt.wait(timeout=max(0.0, seconds)))

    # -- requests ----------------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        name: str,
        expected: Expected,
        body: Any = None,
        check: Callable[[dict[str, Any]], str | None] | None = None,
        idempotency_key: str | None = None,
    ) -> Answer:
        """One request judged against what the situation allows; `check` vets a success's body.

        A keep-alive connection the service closed while it sat idle (STOCKHOLD_KEEP_ALIVE_SECONDS)
        fails before any answer; the request is then sent once more on a fresh connection, which is
        safe here: every POST is idempotent by contract (confirm, release) or carries an
        Idempotency-Key (reserve, restock). That first attempt is counted for the audit only."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        for attempt in (1, 2):
            try:
                with self.client.request(
                    method, path, name=name, json=body, headers=headers, catch_response=True
                ) as resp:
                    status = resp.status_code or 0
                    failed = getattr(resp, "error", None)  # why there was no answer, if there was none
                    if attempt == 1 and isinstance(failed, CLOSED_CONNECTION):
                        raise _StaleConnection  # leaves the block unreported (see ResponseContextManager)
                    answer = self._judged(resp, status, failed, expected, check)
                    if answer.ok:
                        resp.success()
                    else:
                        resp.failure(answer.error)
            except _StaleConnection:
                self.shared.outcomes.response(name, "connection found closed, sent again", None)
                self.shared.outcomes.served(str(self.host), method, answered=False)  # it may have reached it
                continue
            self.shared.outcomes.response(name, answer.label, answer.error)
            self.shared.outcomes.served(str(self.host), method, answered=answer.status != 0)
            return answer
        raise AssertionError("unreachable: the second attempt returns")

    @staticmethod
    def _judged(
        resp: Any,
        status: int,
        failed: BaseException | None,
        expected: Expected,
        check: Callable[[dict[str, Any]], str | None] | None,
    ) -> Answer:
        content_type = resp.headers.get("content-type") if status and resp.headers else None
        transport = f"{type(failed).__name__} {failed}".strip() if failed is not None else ""
        answer = judge(status, content_type, resp.content if status else None, expected, transport)
        if answer.ok and status < 400 and check is not None:
            wrong = check(answer.body)
            if wrong:
                return Answer(answer.status, answer.label, answer.body, wrong)
        return answer

    def reserve(
        self, user_id: str, items: list[dict[str, Any]], name: str, buyer: dict[str, int]
    ) -> tuple[Answer, Hold | None]:
        refused_by = ineligible(self.scenario.eligibility, buyer)

        def check(doc: dict[str, Any]) -> str | None:
            if refused_by:  # a hold for an account the SKU's rules refuse is a defect of the service
                return f"held for an account the eligibility rules refuse ({refused_by})"
            return reservation_error(doc, frozenset({"held"}), user_id=user_id, items=items, needs_deadline=True)

        body = {"user_id": user_id, "items": items, "buyer": buyer}
        expected = CREATED_UNDER_RULES if self.scenario.eligibility else CREATED
        answer = self.call("POST", "/v1/reservations", name, expected, body, check, uuid.uuid4().hex)
        if not answer.ok or answer.status != 201:
            return answer, None
        self.shared.outcomes.holds[self.kind] += 1
        expires = datetime.fromisoformat(answer.body["expires_at"]).timestamp()
        return answer, Hold(answer.body["id"], user_id, items, expires)

    def confirm(self, hold: Hold, name: str, expected: Expected) -> Answer:
        """Pays for a hold. The outcome is tracked from before the request is sent, so a payment
        whose answer never arrives is known to the audit as possibly made."""
        sale, outcomes = hold.sale(), self.shared.outcomes

        def check(doc: dict[str, Any]) -> str | None:
            return reservation_error(
                doc, frozenset({"confirmed"}), reservation_id=hold.reservation_id, items=hold.items
            )

        path = f"/v1/reservations/{hold.reservation_id}/confirm"
        for attempt in range(CONFIRM_TRIES):
            outcomes.confirm_sent(sale)
            answer = self.call("POST", path, name, expected, None, check)
            made = answer.status == 200 and answer.ok
            # a refusal the service explains settles it; a 5xx or no answer at all does not
            definite = made or 400 <= answer.status < 500 or answer.code in RETRIED_CODES
            outcomes.confirm_answered(sale, made, definite)
            if answer.code not in RETRIED_CODES or attempt == CONFIRM_TRIES - 1:
                return answer
            gevent.sleep(1.0)  # Retry-After: 1
        raise AssertionError("unreachable")

    def release(self, hold: Hold, name: str) -> Answer:
        def check(doc: dict[str, Any]) -> str | None:
            # an expired hold stays expired: releasing it is a no-op that says so
            return reservation_error(doc, frozenset({"released", "expired"}), reservation_id=hold.reservation_id)

        return self.call("POST", f"/v1/reservations/{hold.reservation_id}/release", name, RELEASED, None, check)


class JourneyUser(StockholdUser):
    """A person with a goal: one journey per user, or journey after journey when the scenario repeats."""

    abstract = True

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.iteration = 0

    def wait_time(self) -> float:
        return random.uniform(*self.scenario.journey_wait_s) if self.scenario.repeat else 0.0

    @task
    def live(self) -> None:
        one_shot = not self.scenario.repeat
        if self.iteration == 0:
            # Locust spawns a second's users in one batch, class by class: spread each batch over its
            # second so that arrivals are uniform and buyers and scalpers interleave.
            rate = self.scenario.spawn_rate
            gevent.sleep(random.uniform(0, math.floor(max(1.0, rate)) / rate))
        try:
            self.iteration += 1
            self.journey()
            self.shared.outcomes.journeys[self.kind] += 1
        finally:
            if one_shot:
                self.shared.finished += 1
        if self.client_pool is None:
            self.client.client.close()  # a person who left holds no connection open; the next is someone else
        if one_shot:
            self.shared.stopping.wait()  # parked: see the module's docstring
            raise StopUser()

    def journey(self) -> None:
        raise NotImplementedError


class Buyer(JourneyUser):
    """Reserves (retrying a few times, after a pause, while stock is short), thinks, then pays, cancels,
    or walks away; a cancelled reservation sometimes gets a late payment, which must be refused."""

    kind = "buyer"

    def journey(self) -> None:
        b, skus = self.scenario.buyer, self.shared.run.skus
        suffix = f".{self.iteration}" if self.scenario.repeat else ""
        user_id = f"buyer-{self.number}{suffix}"  # a new customer each journey: the limit counts per user
        basket = random.sample(skus, random.randint(1, min(b.max_skus, len(skus))))
        items = [{"sku": sku, "quantity": b.quantity} for sku in basket]
        facts = account_facts(new=random.random() < b.new_account_p)
        hold = None
        for attempt in range(b.attempts):
            if attempt and self.pause(random.uniform(*b.retry_think_s)):
                return
            answer, hold = self.reserve(user_id, items, "buyer: reserve", facts)
            if hold or answer.code != "insufficient_stock":
                break
        if hold is None or self.pause(random.uniform(*b.think_s)):
            return
        if random.random() < b.confirm_p:
            self.confirm(hold, "buyer: confirm", PAID)
        elif random.random() < b.release_p:
            released = self.release(hold, "buyer: release")
            if released.ok and random.random() < b.late_pay_p:
                # released: the payment must be refused; expired before the release: it is a late payment
                # for an expired hold, confirmed only if the stock is there right now
                was = released.body.get("status") if isinstance(released.body, dict) else None
                self.confirm(hold, "buyer: late pay", PAID_AFTER_RELEASE if was == "released" else PAID)


class Scalper(JourneyUser):
    """Fires all its accounts in one burst, retries immediately on 409 insufficient_stock, and either
    leaves the holds it got to expire or pays for them at the last moment."""

    kind = "scalper"

    def journey(self) -> None:
        s, skus = self.scenario.scalper, self.shared.run.skus
        suffix = f".{self.iteration}" if self.scenario.repeat else ""
        target = random.choice(skus)
        accounts = [f"scalper-{self.number}{suffix}-{k}" for k in range(1, s.accounts + 1)]
        burst = [gevent.spawn(self._grab, account, target) for account in accounts]
        gevent.joinall(burst, raise_error=True)
        holds = [g.value for g in burst if g.value is not None]
        payments = [gevent.spawn(self._pay_at_last_moment, h) for h in holds if random.random() < s.pay_p]
        gevent.joinall(payments, raise_error=True)

    def _grab(self, account: str, sku: str) -> Hold | None:
        items = [{"sku": sku, "quantity": self.scenario.scalper.quantity}]
        facts = account_facts(new=random.random() >= self.scenario.scalper.aged_account_p)
        for attempt in range(1 + self.scenario.scalper.retries):
            if attempt and self.shared.halt.is_set():
                return None
            answer, hold = self.reserve(account, items, "scalper: reserve", facts)
            if hold or answer.code != "insufficient_stock":
                return hold
        return None

    def _pay_at_last_moment(self, hold: Hold) -> None:
        deadline = hold.expires_at if hold.expires_at is not None else time.time()
        if self.pause(deadline - self.scenario.scalper.pay_margin_s - time.time()):
            return
        self.confirm(hold, "scalper: pay at last moment", PAID)


class Browser(StockholdUser):
    """Reads availability, again and again; a read showing held + sold above stock is a failure."""

    kind = "browser"

    def wait_time(self) -> float:
        return random.uniform(*self.scenario.browse_wait_s)

    @task
    def live(self) -> None:
        sku = random.choice(self.shared.run.skus)
        self.call("GET", f"/v1/skus/{sku}", "browser: read sku", READ, None, lambda doc: sku_state_error(doc, sku))


class Merchant(StockholdUser):
    """Restocks every SKU of the run periodically, so a long sale keeps going."""

    kind = "merchant"
    fixed_count = 1

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.opened = False

    def wait_time(self) -> float:
        return float(self.scenario.restock_every_s or 60)

    @task
    def live(self) -> None:
        if not self.opened:
            self.opened = True  # the first restock comes one period in, not at the opening
            return
        for sku in self.shared.run.skus:
            self.call(
                "POST",
                f"/v1/skus/{sku}/adjustments",
                "merchant: restock",
                READ,
                {"delta": self.scenario.restock_units, "reason": "load test restock"},
                self._state_check(sku),
                uuid.uuid4().hex,
            )

    @staticmethod
    def _state_check(sku: str) -> Callable[[dict[str, Any]], str | None]:
        return lambda doc: sku_state_error(doc, sku)
