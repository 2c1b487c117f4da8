"""A SKU's purchase policy: the rules that defend a sale against scalpers (pydantic, no FastAPI).

The policy travels in four shapes, all built here so they stay in step:
- the API's nested objects (``max_per_order``, ``eligibility``, ``hold_cooldown`` in a SKU's settings);
- flat integer fields of the SKU's Redis hash, where reserve.lua reads them (0 = rule off);
- the same flat fields on the ``sku_set`` event (the write-behind worker persists them);
- PostgreSQL's ``sku.policy`` JSON object (the same flat fields), which a rebuild writes back to Redis.

Every rule is enforced inside the Lua script that grants a hold, atomically with the stock it guards:
a reservation is refused before it takes anything, and a refused call changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_DAYS = 100_000  # about 270 years: any real account age or membership fits, nonsense does not
MAX_MINUTES = 7 * 24 * 60  # a week: windows and cooldowns longer than a sale make no sense

# The flat fields, in the order reserve.lua reads them after the SKU's counters (lua/includes/common.lua).
POLICY_FIELDS = (
    "max_per_order",
    "min_account_age_days",
    "min_orders",
    "min_member_days",
    "cooldown_after_lapses",
    "cooldown_within_minutes",
    "cooldown_minutes",
)
# Eligibility rules and the buyer fact each one needs, in the order reserve.lua checks them.
ELIGIBILITY_RULES = (
    ("min_account_age_days", "account_age_days"),
    ("min_orders", "orders_count"),
    ("min_member_days", "member_days"),
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Eligibility(_Strict):
    """Minimums a buyer must meet to hold this SKU. A rule left out (or null) is off; a buyer fact the
    checkout did not send counts as failing every rule that needs it."""

    min_account_age_days: int | None = Field(default=None, ge=1, le=MAX_DAYS)
    min_orders: int | None = Field(default=None, ge=1, le=MAX_DAYS)
    min_member_days: int | None = Field(default=None, ge=1, le=MAX_DAYS)


class HoldCooldown(_Strict):
    """The "let it expire, hold again" loophole closed: a user whose holds on this SKU expired or were
    released ``after_lapses`` times within ``within_minutes`` gets no new hold for ``cooldown_minutes``."""

    after_lapses: int = Field(ge=1, le=100)
    within_minutes: int = Field(ge=1, le=MAX_MINUTES)
    cooldown_minutes: int = Field(ge=1, le=MAX_MINUTES)


class Buyer(_Strict):
    """What the checkout knows of the buyer, for eligibility rules. Every fact is optional."""

    account_age_days: int | None = Field(default=None, ge=0, le=MAX_DAYS)
    orders_count: int | None = Field(default=None, ge=0, le=1_000_000_000)
    member_days: int | None = Field(default=None, ge=0, le=MAX_DAYS)

    def script_args(self) -> list[int | str]:
        """reserve.lua's buyer facts, in ELIGIBILITY_RULES order; '' for a fact not sent."""
        return ["" if (v := getattr(self, fact)) is None else v for _, fact in ELIGIBILITY_RULES]


NO_BUYER_ARGS: list[int | str] = ["", "", ""]


class Policy(_Strict):
    """The policy part of a SKU's settings (SkuSettings and SkuState inherit it)."""

    max_per_order: int | None = Field(default=None, ge=1, le=1000)
    eligibility: Eligibility | None = None
    hold_cooldown: HoldCooldown | None = None

    def flat(self) -> dict[str, int]:
        """The POLICY_FIELDS as integers, 0 for a rule that is off."""
        e, c = self.eligibility, self.hold_cooldown
        return {
            "max_per_order": self.max_per_order or 0,
            "min_account_age_days": (e.min_account_age_days or 0) if e else 0,
            "min_orders": (e.min_orders or 0) if e else 0,
            "min_member_days": (e.min_member_days or 0) if e else 0,
            "cooldown_after_lapses": c.after_lapses if c else 0,
            "cooldown_within_minutes": c.within_minutes if c else 0,
            "cooldown_minutes": c.cooldown_minutes if c else 0,
        }

    def script_args(self) -> list[int]:
        flat = self.flat()
        return [flat[f] for f in POLICY_FIELDS]


def policy_from_flat(values: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    """The API's policy fields from the flat ones (a mapping, or values in POLICY_FIELDS order; a
    missing or empty value counts as 0: a SKU written before policies existed has none)."""
    if not isinstance(values, Mapping):
        values = dict(zip(POLICY_FIELDS, values, strict=True))
    v = {f: int(values.get(f) or 0) for f in POLICY_FIELDS}
    rules = {rule: v[rule] or None for rule, _ in ELIGIBILITY_RULES}
    cooldown = None
    if v["cooldown_after_lapses"]:
        cooldown = HoldCooldown(
            after_lapses=v["cooldown_after_lapses"],
            within_minutes=v["cooldown_within_minutes"],
            cooldown_minutes=v["cooldown_minutes"],
        )
    return {
        "max_per_order": v["max_per_order"] or None,
        "eligibility": Eligibility(**rules) if any(rules.values()) else None,
        "hold_cooldown": cooldown,
    }
