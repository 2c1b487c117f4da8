"""Many replicas (issue 7): three separate `stockhold serve` processes and two separate `stockhold worker`
processes on the suite's Redis and PostgreSQL, the users spread over the three, then the audit and the
deployment's own checks (loadtests/deployment.py), end to end through the runner (`python -m loadtests
--replicas 3 --workers 2`). Scaled down (1,000 users) and bounded in time: the suite runs twice in CI.

With --confirm-all every hold is paid for, so the stock ends exactly sold: last-bottle 1, flash-100 100.
The checks themselves are tried on planted violations below, without any process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import asyncpg

from loadtests.audit import Report
from loadtests.deployment import Deployment, Kill, Persistence, Process, persistence_checks, replica_traffic
from loadtests.outcomes import Outcomes
from loadtests.service import Service
from tests.loadtests.conftest import run_module

SOLD_AND_HELD = "SELECT sold, held FROM sku WHERE tenant = 'default' AND sku = $1"
DEPLOYMENT = ["--replicas", "3", "--workers", "2", "--confirm-all", "--users", "1000"]


def _replica_counts(outcomes: dict[str, object], text: str) -> list[int]:
    answered = outcomes["answered"]
    assert isinstance(answered, dict)
    urls = re.findall(r"replica \d (http://127\.0\.0\.1:\d+): users sent", text)
    assert len(set(urls)) == 3, text
    return [int(answered.get(url, 0)) for url in urls]


async def test_last_bottle_sells_one_unit_across_three_replicas_and_two_workers(
    service_env: dict[str, str], redis: object, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    done = run_module("loadtests", ["last-bottle", *DEPLOYMENT, "--results-dir", str(folder)], service_env, 150)

    assert done.returncode == 0, done.stdout
    out = done.stdout
    assert "verdict: every invariant held" in out
    assert "PASS  every replica served traffic (3 replicas)" in out
    assert "PASS  every event persisted exactly once (2 workers, one consumer group)" in out
    # no worker killed: the two workers' acknowledged entries add up to the streams' entries
    assert "= the streams' entries" in out, out
    outcomes = json.loads((folder / "outcomes.json").read_text())
    (sku,) = outcomes["skus"]
    assert sum(item["quantity"] for sale in outcomes["confirmed"] for item in sale["items"]) == 1
    assert tuple(await pg.fetchrow(SOLD_AND_HELD, sku) or ()) == (1, 0)
    counts = _replica_counts(outcomes, out)
    assert all(n > 0 for n in counts), counts
    sent = sum(outcomes["sent"].get(url, 0) for url in re.findall(r"replica \d (http://\S+): users sent", out))
    assert sent == sum(outcomes["responses"].values()), outcomes  # every request went to one of the three
    for i in (1, 2, 3):
        assert "Uvicorn running on http://127.0.0.1:" in (folder / f"replica-{i}.log").read_text()
    for i in (1, 2):
        assert "stopped: " in (folder / f"worker-{i}.log").read_text()  # stopped cleanly, after draining
    ledger = await pg.fetchval("SELECT count(*) FROM stock_movement WHERE sku = $1", sku)
    assert f"ledger rows of the run's SKUs: {ledger} ({ledger} distinct event ids)" in out


async def test_flash_100_sells_exactly_100_with_a_worker_killed_mid_sale(
    service_env: dict[str, str], redis: object, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    args = ["flash-100", *DEPLOYMENT, "--kill-worker", "--results-dir", str(folder)]
    done = run_module("loadtests", args, service_env, 200)

    assert done.returncode == 0, done.stdout
    out = done.stdout
    assert "verdict: every invariant held" in out
    assert "PASS  every replica served traffic (3 replicas)" in out
    assert "PASS  every event persisted exactly once" in out
    assert "PASS  a killed worker's entries taken over" in out
    held = re.search(r"loadtest-worker-1: killed \(SIGKILL\) [0-9.]+ s into the sale holding (\d+)", out)
    assert held and int(held.group(1)) >= 1, out
    assert "entries acknowledged per worker: loadtest-worker-1 killed, loadtest-worker-2 " in out
    outcomes = json.loads((folder / "outcomes.json").read_text())
    (sku,) = outcomes["skus"]
    sales = outcomes["confirmed"]
    assert sum(item["quantity"] for sale in sales for item in sale["items"]) == 100
    assert len({sale["user_id"] for sale in sales}) == 100  # per-user limit 1
    assert tuple(await pg.fetchrow(SOLD_AND_HELD, sku) or ()) == (100, 0)
    confirmed = await pg.fetchval("SELECT count(*) FROM reservation_line WHERE sku = $1 AND status = 'confirmed'", sku)
    assert confirmed == 100
    assert all(n > 0 for n in _replica_counts(outcomes, out))


# -- the checks on planted violations ----------------------------------------------------------------


def _deployment(tmp_path: Path, posts_logged: list[int], kill: Kill | None = None) -> Deployment:
    replicas = []
    for i, n in enumerate(posts_logged, 1):
        log = tmp_path / f"replica-{i}.log"
        log.write_text('INFO:     127.0.0.1:5 - "POST /v1/reservations HTTP/1.1" 409 Conflict\n' * n)
        replicas.append(Process(f"replica-{i}", None, log, f"http://127.0.0.1:{9000 + i}"))  # type: ignore[arg-type]
    workers = [Process(f"w{i}", None, tmp_path / f"w{i}.log") for i in (1, 2)]  # type: ignore[arg-type]
    return Deployment(Service(replicas[0].url, "pg", "redis"), replicas, workers, 16, 0, kill)


def _outcomes(per_replica: list[int]) -> Outcomes:
    outcomes = Outcomes()
    for i, n in enumerate(per_replica, 1):
        for _ in range(n):
            outcomes.served(f"http://127.0.0.1:{9000 + i}", "POST", answered=True)
    return outcomes


def _verdict(report: Report) -> dict[str, str]:
    return {c.name.split(" (")[0]: ("PASS " if c.passed else "FAIL ") + c.detail for c in report.checks}


def test_a_replica_that_served_nothing_or_logged_other_counts_fails(tmp_path: Path) -> None:
    report = Report("t")
    replica_traffic(report, _deployment(tmp_path, [3, 2, 4]), _outcomes([3, 2, 4]))
    assert _verdict(report)["every replica served traffic"].startswith("PASS"), report.text()

    idle = Report("t")
    replica_traffic(idle, _deployment(tmp_path, [3, 2, 0]), _outcomes([3, 2, 0]))
    assert (
        "replica 3 (http://127.0.0.1:9003) answered no user request" in _verdict(idle)["every replica served traffic"]
    )

    miscounted = Report("t")  # its log saw fewer POSTs than it answered: the count is not the replica's
    replica_traffic(miscounted, _deployment(tmp_path, [3, 1, 4]), _outcomes([3, 2, 4]))
    assert "replica 2 logged 1 POSTs" in _verdict(miscounted)["every replica served traffic"]


def _persistence(run: set[tuple[int, str]], ledger: set[tuple[int, str]], **kw: object) -> Persistence:
    values: dict[str, object] = {
        "stream_entries": len(run),
        "run_events": run,
        "ledger_rows": len(ledger),
        "ledger_events": ledger,
        "acknowledged": {"w1": len(run) // 2, "w2": len(run) - len(run) // 2},
        "dead_pending": [],
        "dead_unpersisted": [],
        "backlog_left": 0,
    }
    return Persistence(**{**values, **kw})  # type: ignore[arg-type]


def test_lost_doubled_or_stranded_events_fail(tmp_path: Path) -> None:
    events = {(3, "1-0"), (3, "1-1"), (7, "2-0"), (7, "2-1")}
    deployment = _deployment(tmp_path, [1, 1, 1])

    def verdict(p: Persistence, d: Deployment = deployment) -> dict[str, str]:
        report = Report("t")
        persistence_checks(report, d, p)
        return _verdict(report)

    assert verdict(_persistence(events, events))["every event persisted exactly once"].startswith("PASS")
    lost = verdict(_persistence(events, events - {(7, "2-0")}))["every event persisted exactly once"]
    assert "shard 7 event 2-0 not in the ledger" in lost
    # an entry acknowledged by both workers: their counts exceed the streams'
    twice = verdict(_persistence(events, events, acknowledged={"w1": 3, "w2": 2}))
    assert "workers acknowledged 5 entries, the streams hold 4" in twice["every event persisted exactly once"]

    kill = Kill(worker="w1", pending=[("{7}:events", "2-1")], tries=1, at_s=1.0)
    killed = _deployment(tmp_path, [1, 1, 1], kill)
    taken = verdict(_persistence(events, events, acknowledged={"w1": None, "w2": 2}), killed)
    assert taken["a killed worker's entries taken over"].startswith("PASS"), taken
    stranded = _persistence(events, events, acknowledged={"w1": None, "w2": 2}, dead_pending=kill.pending)
    assert (
        "1 entries still pending on the killed w1" in verdict(stranded, killed)["a killed worker's entries taken over"]
    )
    missed = verdict(_persistence(events, events), _deployment(tmp_path, [1, 1, 1], Kill(worker="w1", error="x")))
    assert missed["a killed worker's entries taken over"].startswith("FAIL"), missed
