"""The audit after a load: reads the service (HTTP) and PostgreSQL, and prints what was proven.

    python -m loadtests.audit --url URL --database-url DSN --skus A,B [--redis-url URL] [--outcomes FILE]

Checks (each PASS or FAIL; exit code 1 if any failed, 2 if the service or PostgreSQL could not be read):

- no oversell: held + sold <= on_hand - safety_stock for every SKU, as the service serves it and as
  PostgreSQL's reservation lines add up;
- PostgreSQL agrees with the service: once the write-behind backlog has drained, each SKU's row and the
  sums of its reservation lines (confirmed -> sold, held -> held) give what the service reports;
- Redis matches PostgreSQL (when the Redis URL is known): app/recovery/reconcile.py's comparison for the
  run's SKUs (it persists what the streams still hold first, as `stockhold reconcile` does);
- with the users' outcomes (written by the locustfile): every reservation confirmed with 200 is
  confirmed in PostgreSQL's reservation_line; PostgreSQL sold exactly what buyers were told they bought
  (a sale nobody was told of is allowed only for a confirm that never got an answer); every response
  was one its situation allowed.

Under live traffic a SKU may change between two reads, so the comparisons are made on a settled
snapshot: service read, PostgreSQL read, service read again unchanged. A difference is reported only if
it persists until the settle timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

from loadtests.outcomes import Outcomes, user_class

COUNTERS = ("on_hand", "safety_stock", "held", "sold")
SETTLE_TIMEOUT_S = 60.0
POLL_S = 0.5


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    title: str
    checks: list[Check] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)  # what was measured, beside the checks

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def add(self, name: str, problems: list[str], ok_detail: str) -> None:
        """A check: passed when no problem was found; the detail names the first problems otherwise."""
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        self.checks.append(Check(name, not problems, ok_detail if not problems else shown))

    def text(self) -> str:
        lines = [self.title, *self.facts, ""]
        lines += [f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}" for c in self.checks]
        broken = [c.name for c in self.checks if not c.passed]
        verdict = "every invariant held" if not broken else f"BROKEN: {', '.join(broken)}"
        return "\n".join([*lines, "", f"verdict: {verdict}"])


@dataclass(frozen=True)
class Snapshot:
    """One settled reading of the run's SKUs on both sides."""

    service: dict[str, dict[str, int]]  # sku -> counters, as served
    rows: dict[str, dict[str, int]]  # sku -> counters of PostgreSQL's sku row
    lines: dict[str, dict[str, int]]  # sku -> {"held": units of held lines, "sold": units of confirmed ones}
    confirmed: dict[tuple[str, str], tuple[str, int]]  # (reservation id, sku) -> (user id, units), PostgreSQL
    statuses: dict[str, int]  # reservation lines per status ("confirmed from an expired hold" apart)
    settled: bool  # the service did not change while PostgreSQL was read

    def disagreements(self) -> list[str]:
        found = []
        for sku, served in self.service.items():
            row = self.rows.get(sku)
            if row is None:
                found.append(f"{sku}: no sku row in PostgreSQL")
                continue
            found += [f"{sku} {c}: service {served[c]}, PostgreSQL {row[c]}" for c in COUNTERS if served[c] != row[c]]
            lines = self.lines.get(sku, {"held": 0, "sold": 0})
            found += [
                f"{sku} {c}: sku row {row[c]}, reservation lines {lines[c]}"
                for c in ("held", "sold")
                if row[c] != lines[c]
            ]
        return found


# -- reading -------------------------------------------------------------------------------------------


async def read_service(http: httpx.AsyncClient, skus: Iterable[str]) -> dict[str, dict[str, int]]:
    states = {}
    for sku in skus:
        response = await http.get(f"/v1/skus/{sku}")
        response.raise_for_status()
        body = response.json()
        states[sku] = {c: int(body[c]) for c in COUNTERS}
        # a presale lets held + sold pass on_hand by the units on backorder, within its cap
        presale = body.get("presale") or {}
        states[sku] |= {"backordered": int(body.get("backordered", 0)), "presale_cap": int(presale.get("cap", 0))}
    return states


@dataclass(frozen=True)
class PostgresView:
    rows: dict[str, dict[str, int]]
    lines: dict[str, dict[str, int]]
    confirmed: dict[tuple[str, str], tuple[str, int]]
    statuses: dict[str, int]


async def read_postgres(pg: asyncpg.Pool, tenant: str, skus: list[str]) -> PostgresView:
    """The run's SKU rows and reservation lines, read in one snapshot (see Snapshot for the fields)."""
    async with pg.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        sku_rows = await conn.fetch(
            "SELECT sku, on_hand, safety_stock, held, sold FROM sku WHERE tenant = $1 AND sku = ANY($2::text[])",
            tenant,
            skus,
        )
        line_rows = await conn.fetch(
            "SELECT reservation_id, sku, user_id, quantity, held, status FROM reservation_line"
            " WHERE tenant = $1 AND sku = ANY($2::text[]) AND status IN ('held', 'confirmed')",
            tenant,
            skus,
        )
        status_rows = await conn.fetch(
            "SELECT status, confirmed_how = 'd' AS direct, count(*) AS n FROM reservation_line"
            " WHERE tenant = $1 AND sku = ANY($2::text[]) GROUP BY 1, 2",
            tenant,
            skus,
        )
    statuses = {("confirmed after its hold expired" if r["direct"] else r["status"]): int(r["n"]) for r in status_rows}
    rows = {r["sku"]: {c: int(r[c]) for c in COUNTERS} for r in sku_rows}
    lines = {sku: {"held": 0, "sold": 0} for sku in skus}
    confirmed: dict[tuple[str, str], tuple[str, int]] = {}
    for r in line_rows:
        if r["status"] == "confirmed":
            lines[r["sku"]]["sold"] += r["quantity"]
            confirmed[(r["reservation_id"], r["sku"])] = (r["user_id"], int(r["quantity"]))
        elif r["held"]:  # an on_payment line holds nothing while pending
            lines[r["sku"]]["held"] += r["quantity"]
    return PostgresView(rows, lines, confirmed, statuses)


def backlog_from_metrics(text: str) -> tuple[int, int]:
    """(events not yet in PostgreSQL, shard count) from /metrics: pending + undelivered per shard."""
    waiting, shards = 0.0, set()
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in ("stockhold_stream_pending", "stockhold_stream_undelivered"):
            labels, _, value = rest.partition("} ")
            waiting += float(value)
            shards.add(labels)
    return int(waiting), len(shards)


async def wait_drained(http: httpx.AsyncClient, deadline: float) -> tuple[int, int, float]:
    """Polls /metrics until no event waits for PostgreSQL: (events left, shard count, seconds waited)."""
    started = time.monotonic()
    while True:
        response = await http.get("/metrics")
        response.raise_for_status()
        waiting, shards = backlog_from_metrics(response.text)
        if waiting == 0 or time.monotonic() > deadline:
            return waiting, shards, time.monotonic() - started
        await asyncio.sleep(POLL_S)


async def settled_snapshot(
    http: httpx.AsyncClient, pg: asyncpg.Pool, tenant: str, skus: list[str], deadline: float
) -> Snapshot:
    """Reads both sides until they agree on a settled service, or the deadline passes (the last reading)."""
    while True:
        before = await read_service(http, skus)
        view = await read_postgres(pg, tenant, skus)
        after = await read_service(http, skus)
        snapshot = Snapshot(after, view.rows, view.lines, view.confirmed, view.statuses, settled=before == after)
        if (snapshot.settled and not snapshot.disagreements()) or time.monotonic() > deadline:
            return snapshot
        await asyncio.sleep(POLL_S)


async def redis_drift(redis_url: str, pg: asyncpg.Pool, shards: int, tenant: str, skus: list[str]) -> list[str]:
    """reconcile's comparison (Redis against what PostgreSQL implies), for the run's SKUs."""
    from app.recovery.reconcile import compare
    from app.stock.keys import KeySpace
    from app.store.redis import connect_redis

    redis = connect_redis(redis_url, pool_size=4)
    try:
        drift = await compare(redis, pg, KeySpace(shards))
    finally:
        await redis.aclose()
    wanted = set(skus)
    return [
        f"{d.sku} {d.field}: Redis {d.redis}, PostgreSQL implies {d.postgres}"
        for d in drift
        if d.tenant == tenant and d.sku in wanted
    ]


# -- judging -------------------------------------------------------------------------------------------


def oversells(snapshot: Snapshot) -> list[str]:
    found = []
    for sku, s in snapshot.service.items():
        presale = s.get("presale_cap", 0)  # invariant 1 with presale: see read_service
        cap = s["on_hand"] - s["safety_stock"] + presale
        if s["held"] + s["sold"] > cap or s.get("backordered", 0) > presale:
            found.append(f"{sku}: service held {s['held']} + sold {s['sold']} > {cap}")
        row, lines = snapshot.rows.get(sku), snapshot.lines.get(sku)
        if row and lines and lines["held"] + lines["sold"] > row["on_hand"] - row["safety_stock"] + presale:
            found.append(f"{sku}: PostgreSQL lines held {lines['held']} + sold {lines['sold']} > {cap}")
    return found


def unpersisted_sales(snapshot: Snapshot, outcomes: Outcomes) -> list[str]:
    """Sales a buyer was told of (200) that PostgreSQL does not hold as confirmed."""
    missing = []
    for sale in outcomes.confirmed.values():
        for item in sale.items:
            if (sale.reservation_id, item["sku"]) not in snapshot.confirmed:
                missing.append(f"{sale.reservation_id} ({sale.user_id}, {item['sku']}) not confirmed in PostgreSQL")
    return missing


def untold_sales(snapshot: Snapshot, outcomes: Outcomes) -> list[str]:
    """Per SKU, PostgreSQL's sold against the units confirmed with 200; any extra sale must be one whose
    confirm never got an answer."""
    problems = []
    for sku, row in snapshot.rows.items():
        told = sum(sale.units(sku) for sale in outcomes.confirmed.values())
        if row["sold"] < told:
            problems.append(f"{sku}: PostgreSQL sold {row['sold']} < {told} units confirmed with 200")
    for rid, sku in sorted(snapshot.confirmed):
        if rid not in outcomes.confirmed and rid not in outcomes.unknown:
            problems.append(f"{rid} ({sku}) sold in PostgreSQL but its buyer was never told so (and never asked)")
    return problems


def winners(snapshot: Snapshot) -> str:
    """Units sold per user class, with the accounts (and, for scalpers, the people) that got them."""
    units: Counter[str] = Counter()
    accounts: dict[str, set[str]] = {}
    for user_id, quantity in snapshot.confirmed.values():
        kind = user_class(user_id)
        units[kind] += quantity
        # scalper-12-3 is account 3 of scalper 12 (scalper-12.4-3: of its 4th journey): one person
        person = user_id.rsplit("-", 1)[0].split(".")[0] if kind == "scalper" else user_id
        accounts.setdefault(kind, set()).add(user_id)
        accounts.setdefault(f"{kind} people", set()).add(person)
    total = sum(units.values())
    parts = []
    for kind in sorted(units):
        share = f"{100 * units[kind] / total:.0f}%" if total else "-"
        who = f"{len(accounts[kind])} accounts"
        if kind == "scalper":
            who += f" of {len(accounts['scalper people'])} scalpers"
        parts.append(f"{kind}s {units[kind]} ({share}, {who})")
    return "winners (PostgreSQL, confirmed units): " + ("; ".join(parts) if parts else "nobody bought anything")


def sku_table(snapshot: Snapshot) -> list[str]:
    rows: list[tuple[str, ...]] = [("sku", "on_hand", "safety", "held", "sold", "available", "| pg held", "pg sold")]
    for sku, s in snapshot.service.items():
        row = snapshot.rows.get(sku, {})
        available = s["on_hand"] - s["safety_stock"] - s["held"] - s["sold"]
        pg = (f"| {row.get('held', '-')}", str(row.get("sold", "-")))
        rows.append((sku, *(str(s[c]) for c in COUNTERS), str(available), *pg))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(_pad(i, c, w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]


def _pad(column: int, cell: str, width: int) -> str:
    return cell.rjust(width) if column else cell.ljust(width)


def response_facts(outcomes: Outcomes) -> list[str]:
    codes = outcomes.codes()
    facts = ["answers by outcome: " + ", ".join(f"{label} x{n}" for label, n in sorted(codes.items()))]
    problems = Counter({label: n for label, n in codes.items() if label[:1] in "45" or label.startswith("0")})
    if problems:
        facts.append("errors by problem code: " + ", ".join(f"{k} x{n}" for k, n in problems.most_common()))
    told: Counter[str] = Counter()
    for sale in outcomes.confirmed.values():
        told[user_class(sale.user_id)] += sum(int(i["quantity"]) for i in sale.items)
    holds = ", ".join(f"{k} {n}" for k, n in sorted(outcomes.holds.items())) or "none"
    sales = ", ".join(f"{k} {n}" for k, n in sorted(told.items())) or "none"
    facts.append(f"holds granted: {holds}; units confirmed with 200: {sales}")
    facts.append(f"confirms never answered: {len(outcomes.unknown)}")
    return facts


# -- the audit -----------------------------------------------------------------------------------------


async def run_audit(
    url: str,
    database_url: str,
    skus: list[str],
    *,
    redis_url: str | None = None,
    outcomes: Outcomes | None = None,
    tenant: str = "default",
    settle_timeout_s: float = SETTLE_TIMEOUT_S,
) -> Report:
    deadline = time.monotonic() + settle_timeout_s
    report = Report(f"audit of {len(skus)} SKU(s) on {url}: {', '.join(skus)}")
    pg = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            waiting, shards, waited = await wait_drained(http, deadline)
            report.facts.append(
                f"write-behind backlog: {'drained' if not waiting else f'{waiting} events still waiting'}"
                f" after {waited:.1f} s ({shards} shards)"
            )
            snapshot = await settled_snapshot(http, pg, tenant, skus, deadline)
        report.facts += sku_table(snapshot)
        lines = ", ".join(f"{status} {n}" for status, n in sorted(snapshot.statuses.items()))
        report.facts.append(f"reservation lines in PostgreSQL: {lines or 'none'}")
        report.facts.append(winners(snapshot))
        if outcomes is not None:
            report.facts += response_facts(outcomes)

        report.add("no oversell", oversells(snapshot), "held + sold <= on_hand - safety_stock for every SKU")
        disagreements = snapshot.disagreements()
        if not snapshot.settled:
            disagreements.append("the service kept changing until the settle timeout")
        report.add(
            "PostgreSQL agrees with the service",
            disagreements,
            "sku rows and reservation lines give the on_hand, held and sold served",
        )
        if redis_url:
            report.add(
                "Redis matches PostgreSQL",
                await redis_drift(redis_url, pg, shards or 16, tenant, skus),
                "reconcile finds no drift on the run's SKUs",
            )
        else:
            report.facts.append("Redis against PostgreSQL: not compared (no Redis URL)")
        if outcomes is not None:
            report.add(
                "every confirmed sale persisted",
                unpersisted_sales(snapshot, outcomes),
                f"all {len(outcomes.confirmed)} reservations confirmed with 200 are confirmed in reservation_line",
            )
            sold = sum(r["sold"] for r in snapshot.rows.values())
            report.add(
                "sold is what buyers were told",
                untold_sales(snapshot, outcomes),
                f"PostgreSQL sold {sold} = units confirmed with 200"
                + (f" (+ unanswered confirms: {len(outcomes.unknown)})" if outcomes.unknown else ""),
            )
            unexpected = [f"{reason} (x{n})" for reason, n in outcomes.unexpected.most_common()]
            total = sum(outcomes.responses.values())
            report.add("every response expected", unexpected, f"all {total} answers were ones their situation allows")
    finally:
        await pg.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--database-url", required=True, help="the PostgreSQL the service uses")
    parser.add_argument("--skus", required=True, help="comma-separated SKUs to audit")
    parser.add_argument("--redis-url", help="the Redis the service uses: adds reconcile's comparison")
    parser.add_argument("--outcomes", type=Path, help="outcomes.json a load test's users wrote")
    parser.add_argument("--tenant", default="default")
    parser.add_argument("--settle-timeout", type=float, default=SETTLE_TIMEOUT_S, help="seconds (default 60)")
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(
            run_audit(
                args.url,
                args.database_url,
                [s for s in args.skus.split(",") if s],
                redis_url=args.redis_url,
                outcomes=Outcomes.load(args.outcomes) if args.outcomes else None,
                tenant=args.tenant,
                settle_timeout_s=args.settle_timeout,
            )
        )
    except (httpx.HTTPError, asyncpg.PostgresError, OSError) as exc:
        # nothing was proven: say why, and fail apart from a broken invariant (exit code 2)
        print(f"audit could not read the service or PostgreSQL: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(report.text())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
