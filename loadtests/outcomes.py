"""What the simulated users saw, written by the locustfile when the test stops and read by the audit.

Confirmations are tracked from the moment a confirm is sent: one answered 200 is a sale the buyer was
told about (the audit demands it in PostgreSQL); one answered with a refusal was not made; one never
answered (connection error, timeout, user stopped mid-request, 5xx) has an unknown outcome — PostgreSQL
may hold it as a sale, and the audit accepts that for exactly these reservations and no others.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def user_class(user_id: str) -> str:
    """User ids carry their class: 'buyer-12', 'scalper-7.3-2' -> 'buyer', 'scalper'."""
    return user_id.split("-", 1)[0] if "-" in user_id else "other"


@dataclass
class Sale:
    reservation_id: str
    user_id: str
    items: list[dict[str, Any]]  # [{"sku", "quantity"}]

    def units(self, sku: str) -> int:
        return sum(int(i["quantity"]) for i in self.items if i["sku"] == sku)


@dataclass
class Outcomes:
    confirmed: dict[str, Sale] = field(default_factory=dict)  # answered 200 with status confirmed
    unknown: dict[str, Sale] = field(default_factory=dict)  # confirm sent, no definite answer
    responses: Counter[str] = field(default_factory=Counter)  # "<request name> -> <label>" -> count
    unexpected: Counter[str] = field(default_factory=Counter)  # "<request name>: <reason>" -> count
    journeys: Counter[str] = field(default_factory=Counter)  # finished journeys per user class
    holds: Counter[str] = field(default_factory=Counter)  # 201s per user class
    # per base URL the users sent to (one per API replica), and per "<METHOD> <URL>": requests sent, and
    # those answered (any status)
    sent: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)

    # -- recording (the locustfile) ----------------------------------------------------------------

    def confirm_sent(self, sale: Sale) -> None:
        if sale.reservation_id not in self.confirmed:
            self.unknown[sale.reservation_id] = sale

    def confirm_answered(self, sale: Sale, confirmed: bool, definite: bool) -> None:
        """`definite`: the answer settles whether the sale was made (200 or a refusal, not a 5xx / no answer)."""
        if confirmed:
            self.confirmed[sale.reservation_id] = sale
            self.unknown.pop(sale.reservation_id, None)
        elif definite:
            self.unknown.pop(sale.reservation_id, None)

    def response(self, name: str, label: str, error: str | None) -> None:
        self.responses[f"{name} -> {label}"] += 1
        if error is not None:
            self.unexpected[f"{name}: {_shorten(error)}"] += 1

    def served(self, host: str, method: str, answered: bool) -> None:
        """One request sent to `host` (counted under the host, and under "<METHOD> <host>")."""
        for key in (host, f"{method} {host}"):
            self.sent[key] += 1
            if answered:
                self.answered[key] += 1

    # -- files -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        def sales(d: dict[str, Sale]) -> list[dict[str, Any]]:
            return [{"id": s.reservation_id, "user_id": s.user_id, "items": s.items} for s in d.values()]

        return {
            "confirmed": sales(self.confirmed),
            "unknown": sales(self.unknown),
            "responses": dict(sorted(self.responses.items())),
            "unexpected": dict(self.unexpected.most_common()),
            "journeys": dict(self.journeys),
            "holds": dict(self.holds),
            "sent": dict(sorted(self.sent.items())),
            "answered": dict(sorted(self.answered.items())),
        }

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**(extra or {}), **self.to_dict()}, indent=1))
        tmp.replace(path)  # the audit never reads half a file

    @classmethod
    def load(cls, path: Path) -> Outcomes:
        raw = json.loads(path.read_text())

        def sales(rows: list[dict[str, Any]]) -> dict[str, Sale]:
            return {r["id"]: Sale(r["id"], r["user_id"], r["items"]) for r in rows}

        return cls(
            confirmed=sales(raw.get("confirmed", [])),
            unknown=sales(raw.get("unknown", [])),
            responses=Counter(raw.get("responses", {})),
            unexpected=Counter(raw.get("unexpected", {})),
            journeys=Counter(raw.get("journeys", {})),
            holds=Counter(raw.get("holds", {})),
            sent=Counter(raw.get("sent", {})),
            answered=Counter(raw.get("answered", {})),
        )

    # -- reading (the audit) -----------------------------------------------------------------------

    def codes(self) -> Counter[str]:
        """Answers by outcome across requests: '201' / '409 insufficient_stock' / ... -> count."""
        by_label: Counter[str] = Counter()
        for key, count in self.responses.items():
            by_label[key.rpartition(" -> ")[2]] += count
        return by_label


def _shorten(reason: str) -> str:
    # reservation ids and SKU names make every message unique; the counts want the kind of failure
    words = ["rsv_…" if w.startswith("rsv_") else w for w in reason.split()]
    return " ".join(words)[:160]
