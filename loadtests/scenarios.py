"""What each scenario asks: how many people of which kind, how they behave, and the stock they fight over.

A scenario is plain data. The runner turns it into Locust's command line (users, spawn rate, run time,
user classes) and hands the rest to the locustfile as JSON in one environment variable, so the Locust
process needs nothing but this module to know what to do.

Times are seconds; ranges are (low, high) drawn uniformly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
ENV_VAR = "STOCKHOLD_LOADTEST"  # the run (scenario + SKUs + where to write outcomes), JSON
OUTCOMES_FILE = "outcomes.json"  # what the users saw (loadtests/outcomes.py), for the audit
STATS_FILE = "stats.json"  # Locust's final figures per request name (its CSV is refreshed once a second only)


@dataclass(frozen=True)
class BuyerBehaviour:
    """A real buyer: one account, reserves, thinks, pays with some probability, sometimes cancels."""

    attempts: int = 5  # reserve attempts while stock is short: people refresh a sold-out page a few times
    retry_think_s: tuple[float, float] = (1.0, 4.0)
    think_s: tuple[float, float] = (1.0, 5.0)  # between the hold and the payment
    confirm_p: float = 0.85
    release_p: float = 0.5  # of those who do not pay: cancel rather than walk away (the hold then expires)
    late_pay_p: float = 0.3  # after cancelling, a payment arrives anyway: must answer reservation_released
    max_skus: int = 1  # basket size drawn from 1..max_skus (distinct SKUs: cross-shard reservations)
    quantity: int = 1
    # Real customers mostly have history; some opened their account today and fail eligibility rules
    # (the price of the rules, measured alongside what they stop).
    new_account_p: float = 0.1


@dataclass(frozen=True)
class ScalperBehaviour:
    """A scalper: several accounts fired in one burst, immediate retries on 409, holds either left to
    expire (denying them to others for a whole hold_ttl) or paid at the last moment."""

    accounts: int = 3  # at most 10: FastHttpUser's connection pool per user
    retries: int = 5  # immediate retries per account on 409 insufficient_stock
    pay_p: float = 0.5  # pay at the last moment; otherwise leave the hold to expire
    pay_margin_s: float = 5.0  # how long before the deadline the last-moment payment is sent
    quantity: int = 1
    # The seeds' scalpers used accounts opened that day, with no orders; a few buy aged accounts.
    aged_account_p: float = 0.1


@dataclass(frozen=True)
class Weights:
    """Relative numbers of each kind of user (Locust's class weights); 0 leaves the kind out."""

    buyer: int = 2
    scalper: int = 1
    browser: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    users: int
    spawn_rate: float  # users arriving per second
    run_time_s: int  # hard bound of the load phase; flash sales usually end sooner (see stop_when_sold_out)
    on_hand: int  # per SKU
    sku_count: int = 1
    safety_stock: int = 0
    per_user_limit: int | None = None
    hold_ttl_seconds: int = 900
    # The SKUs' eligibility rules (PUT /v1/skus' `eligibility`); None: off. Users always send what a
    # checkout knows of them (`buyer`), so a run with rules and one without differ only by the rules.
    eligibility: dict[str, int] | None = None
    weights: Weights = field(default_factory=Weights)
    buyer: BuyerBehaviour = field(default_factory=BuyerBehaviour)
    scalper: ScalperBehaviour = field(default_factory=ScalperBehaviour)
    browse_wait_s: tuple[float, float] = (0.5, 2.0)  # between two reads of a browser
    # None: every user opens its own connections, as people reaching the service directly would; N: all
    # users share N keep-alive connections, as a checkout backend in front of stockhold would (requests
    # then queue for a free connection, and that wait is part of the latency Locust reports).
    connections: int | None = None
    # One journey per user (a flash sale's crowd arrives once), or journey after journey (steady traffic):
    repeat: bool = False
    journey_wait_s: tuple[float, float] = (1.0, 5.0)  # between two journeys of a repeating user
    restock_every_s: float | None = None  # a merchant adds restock_units to every SKU this often
    restock_units: int = 0
    # End the load as soon as every unit is sold (nothing can change any more but refusals); a run also
    # ends when every one-journey user has finished, and at run_time_s in any case.
    stop_when_sold_out: bool = True

    @property
    def cap(self) -> int:
        """Units for sale per SKU at the start: on_hand - safety_stock."""
        return self.on_hand - self.safety_stock

    def user_classes(self) -> list[str]:
        """Locust user class names taking part (locustfile.py defines them)."""
        names = [name for name, weight in dataclasses.asdict(self.weights).items() if weight > 0]
        classes = [name.capitalize() for name in names]
        if self.restock_every_s:
            classes.append("Merchant")
        return classes


FLASH_100 = Scenario(
    name="flash-100",
    summary="100 units, 10,000 buyers (a third scalpers), per-user limit 1",
    users=10_000,
    spawn_rate=2_000,
    run_time_s=180,
    on_hand=100,
    per_user_limit=1,
    hold_ttl_seconds=20,
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="last-bottle",
            summary="1 unit, 2,000 users (a third scalpers) arriving within one second",
            users=2_000,
            spawn_rate=2_000,
            run_time_s=90,
            on_hand=1,
            per_user_limit=1,
            # short enough that an abandoned hold comes back while the crowd is still there
            hold_ttl_seconds=10,
            buyer=BuyerBehaviour(attempts=3, retry_think_s=(0.5, 2.0), think_s=(0.5, 2.0)),
            scalper=ScalperBehaviour(retries=3, pay_margin_s=3.0),
        ),
        FLASH_100,
        # the same sale and crowd, only the SKU's rules differ: the scalpers' share of winners compares
        dataclasses.replace(
            FLASH_100,
            name="flash-100-eligibility",
            summary="flash-100 with eligibility rules on: account >= 30 days old with >= 1 order",
            eligibility={"min_account_age_days": 30, "min_orders": 1},
        ),
        Scenario(
            name="steady-checkout",
            summary="10 minutes of mixed traffic over 4 SKUs: holds expiring, restocks, browsers",
            users=200,
            spawn_rate=20,
            run_time_s=600,
            sku_count=4,
            on_hand=100,
            safety_stock=5,
            per_user_limit=2,
            # short, so that holds really expire: about a third of the buyers think longer than this
            hold_ttl_seconds=8,
            weights=Weights(buyer=5, scalper=2, browser=3),
            buyer=BuyerBehaviour(
                attempts=2, think_s=(1.0, 12.0), confirm_p=0.7, release_p=0.5, late_pay_p=0.3, max_skus=2
            ),
            scalper=ScalperBehaviour(retries=3, pay_p=0.3, pay_margin_s=2.0, quantity=2),
            repeat=True,
            journey_wait_s=(1.0, 5.0),
            restock_every_s=10,
            restock_units=40,
            stop_when_sold_out=False,
        ),
    )
}


@dataclass(frozen=True)
class Run:
    """One run of a scenario: what the locustfile reads from ENV_VAR."""

    scenario: Scenario
    run_id: str
    skus: list[str]
    results_dir: str  # the locustfile writes OUTCOMES_FILE and STATS_FILE here when the test stops
    tenant: str = "default"
    # Several API replicas of one deployment: each user sends all its requests to one of these base URLs,
    # taken in turn as users arrive (as a load balancer spreading connections would). Empty: Locust's --host.
    hosts: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Run:
        raw = json.loads(text)
        return cls(**{**raw, "scenario": scenario_from_dict(raw["scenario"])})


def scenario_from_dict(raw: dict[str, Any]) -> Scenario:
    return _build(Scenario, raw)


def _build(kind: type[T], raw: dict[str, Any]) -> T:
    """A (nested, frozen) dataclass from its asdict() form: JSON turns tuples into lists, undone here."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    for name, value in raw.items():
        if name not in names:
            raise ValueError(f"{kind.__name__} has no field {name!r}")
        nested = _NESTED.get(name)
        if nested is not None and isinstance(value, dict):
            value = _build(nested, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return kind(**values)


_NESTED: dict[str, type] = {"weights": Weights, "buyer": BuyerBehaviour, "scalper": ScalperBehaviour}


def with_overrides(scenario: Scenario, overrides: dict[str, Any]) -> Scenario:
    """The scenario with dotted fields replaced, e.g. {"users": 1500, "scalper.pay_p": 1.0}."""
    raw = dataclasses.asdict(scenario)
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"unknown scenario setting {path!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"unknown scenario setting {path!r}")
        node[leaf] = value
    return scenario_from_dict(raw)


def parse_setting(text: str) -> tuple[str, Any]:
    """'scalper.pay_p=1' -> ('scalper.pay_p', 1); values are JSON literals, or plain strings."""
    path, sep, value = text.partition("=")
    if not sep or not path:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return path.strip(), json.loads(value)
    except json.JSONDecodeError:
        return path.strip(), value
