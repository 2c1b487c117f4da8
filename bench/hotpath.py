"""Side-by-side benchmark of the reserve hot path (`make bench`, issue 4).

Four designs of "reserve one unit of a hot SKU", each served the same way (uvicorn, 2 worker processes,
no access log, uvloop + httptools) and loaded the same way (wrk, a compiled load generator: 2 threads,
64 connections, every request by another user), in interleaved rounds on this machine:

- stockhold: POST /v1/reservations (`stockhold serve --workers 2`, its write-behind worker in process,
  as `make run` runs it);
- trivial: the cheapest FastAPI JSON endpoint (bench/peers.py), the framework's own ceiling;
- pg-cte: PostgreSQL only, one conditional UPDATE + INSERT statement (bench/peers.py);
- pg-txn: PostgreSQL only, the textbook BEGIN / UPDATE / INSERT / COMMIT (bench/peers.py).

Prints per design the median requests/s and latency percentiles over the rounds, the paired ratios
(stockhold over each design, round by round, then the median), Redis server time per reserve call (INFO
commandstats over stockhold's rounds), and whether each target of issue 4 is met. Writes a markdown table
and a PNG chart under bench/results/. Then the load-test audit checks the hot SKU: nothing oversold, every
hold and sale in PostgreSQL (loadtests/audit.py; a broken invariant fails the bench).

    make bench                                  # embedded servers in a temporary directory
    REDIS_URL=... DATABASE_URL=... make bench   # or given servers (their stock state is wiped!)
    BENCH_ROUNDS=5 BENCH_SECONDS=15 make bench  # more, longer rounds

Everything runs on 127.0.0.1, bounded in time (about 3 minutes by default), and stops what it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.stock.schemas import ReservationItem, ReservationRequest
from app.stock.service import StockService
from app.store.postgres import apply_migrations, create_pool
from app.store.redis import connect_redis
from app.store.scripts import Scripts
from app.worker.backlog import read_backlog
from app.worker.ledger import PostgresLedger
from bench.servers import free_port, stop_process, workspace

REPO = Path(__file__).resolve().parents[1]
WRK_SCRIPT = REPO / "bench" / "wrk" / "reserve.lua"
RESULTS = REPO / "bench" / "results"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
WARMUP_SECONDS = 3
THREADS, CONNECTIONS, WORKERS = 2, 64, 2
SHARDS = 16
TENANT = "default"
SKU = "bench-hot"
STOCK = 1_000_000_000  # never sells out during the bench: every request does the whole reservation
STATE_TABLES = "stock_movement, sku, reservation, reservation_line, worker_progress"
DESIGNS = ("stockhold", "trivial", "pg-cte", "pg-txn")
PATHS = {"stockhold": "/v1/reservations", "trivial": "/trivial", "pg-cte": "/pg/cte", "pg-txn": "/pg/txn"}
TARGETS = {"trivial": 1.5, "pg-cte": 4.0, "pg-txn": 10.0}  # stockhold's throughput over each, at least
P99_TARGET_MS = 15.0
REDIS_US_TARGET = 12.0
# wrk's done() hook prints one line of exact figures, no parsing of its human report
WRK_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class Round:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    failed: int


@dataclass
class Results:
    rounds: dict[str, list[Round]] = field(default_factory=lambda: {d: [] for d in DESIGNS})
    redis_us: list[float] = field(default_factory=list)  # EVALSHA usec_per_call in each stockhold round
    redis_us_quiet: float = 0.0  # the same, reserve calls alone on a machine at rest
    lag_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)  # write-behind lag of the holds: p50, p99, max
    steal: float | None = None  # share of the CPU the hypervisor took during the rounds (Linux), if known

    def median(self, design: str, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.rounds[design]))

    def paired(self, other: str) -> list[float]:
        return [s.rps / o.rps for s, o in zip(self.rounds["stockhold"], self.rounds[other], strict=True)]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def run_audit(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


async def wait_answering(url: str, timeout_s: float = 60) -> None:
    async with httpx.AsyncClient(timeout=1) as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if (await client.get(url)).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def wrk_script(work: Path) -> Path:
    """bench/wrk/reserve.lua with the hook that prints wrk's figures as JSON, written into `work`."""
    script = work / "reserve.lua"
    script.write_text(WRK_SCRIPT.read_text() + WRK_DONE)
    return script


def wrk(base: str, design: str, seconds: int, script: Path) -> Round:
    cmd = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", str(script), base + PATHS[design]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    data = json.loads(line.removeprefix("WRK_JSON "))
    return Round(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        requests=data["requests"],
        failed=data["non2xx"] + data["socket_errors"],
    )


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat's first line), or None where there is no /proc."""
    try:
        with open("/proc/stat") as stat:
            return [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """What share of the CPU time between two readings the hypervisor gave to other guests ("steal",
    the 8th counter): on a shared VM, why one run's figures can differ from another's."""
    if not before or not after or len(before) < 8:
        return None
    delta = [a - b for a, b in zip(after, before, strict=True)]
    return delta[7] / max(sum(delta[:8]), 1)


async def evalsha_totals(redis: Redis) -> tuple[int, int]:
    stats = (await redis.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def redis_time_alone(redis: Redis, pg: asyncpg.Pool, keys: KeySpace, count: int = 20_000) -> float:
    """Server time per reserve.lua call (INFO commandstats) with nothing else running: what the script
    itself costs Redis, which the figure under load inflates with the CPU it waited for."""
    scripts = Scripts(redis)
    service = StockService(redis, scripts, keys, PostgresLedger(pg), idempotency_ttl_seconds=3600)
    before = await evalsha_totals(redis)

    async def buyer(first: int) -> None:
        for i in range(first, count, 64):
            request = ReservationRequest(user_id=f"alone-{i}", items=[ReservationItem(sku=SKU, quantity=1)])
            await service.reserve(TENANT, request)

    await asyncio.gather(*(buyer(k) for k in range(64)))
    calls, usec = (a - b for a, b in zip(await evalsha_totals(redis), before, strict=True))
    return usec / calls


async def reset(redis: Redis, pg: asyncpg.Pool, keys: KeySpace) -> None:
    await redis.flushdb()
    await pg.execute(f"TRUNCATE {STATE_TABLES}")
    await pg.execute("DROP TABLE IF EXISTS peer_hold, peer_stock")
    for shard in keys.all_shards():  # an empty PostgreSQL rebuilt into an empty Redis
        await redis.set(keys.ready(shard), '{"source": "bench"}')


async def wait_drained(redis: Redis, keys: KeySpace, timeout_s: float) -> float:
    started = time.monotonic()
    while sum(b.unpersisted for b in await read_backlog(redis, keys)) > 0:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"write-behind backlog not drained in {timeout_s}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def report(results: Results, servers: str) -> str:
    def fmt_ratio(other: str) -> str:
        ratios = results.paired(other)
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    lines = [
        f"`make bench` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} cores, {servers}; "
        f"wrk -t{THREADS} -c{CONNECTIONS}, {ROUNDS} interleaved rounds of {SECONDS} s, uvicorn with "
        f"{WORKERS} workers for every design.",
        "",
        "| design | requests/s (median) | p50 ms | p99 ms | stockhold vs it (paired, median and range) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for design in DESIGNS:
        ratio = "" if design == "stockhold" else fmt_ratio(design)
        lines.append(
            f"| {design} | {results.median(design, 'rps'):,.0f} | {results.median(design, 'p50_ms'):.1f} | "
            f"{results.median(design, 'p99_ms'):.1f} | {ratio} |"
        )
    redis_us = results.redis_us_quiet
    p99 = results.median("stockhold", "p99_ms")
    lines += ["", "| target | measured | met |", "| --- | ---: | :---: |"]
    for other, want in TARGETS.items():
        got = statistics.median(results.paired(other))
        lines.append(f"| reserve >= {want:g}x {other} | {got:.2f}x | {'yes' if got >= want else 'no'} |")
    lines.append(f"| p99 <= {P99_TARGET_MS:g} ms | {p99:.1f} ms | {'yes' if p99 <= P99_TARGET_MS else 'no'} |")
    lines.append(
        f"| Redis time per reserve <= {REDIS_US_TARGET:g} us | {redis_us:.1f} us alone "
        f"({statistics.median(results.redis_us):.1f} us under the load) | "
        f"{'yes' if redis_us <= REDIS_US_TARGET else 'no'} |"
    )
    p50, p99_lag, worst = results.lag_ms
    lines += [
        "",
        f"Write-behind lag of every hold made (worker in each API process, rows written - event time): "
        f"p50 {p50:,.0f} ms, p99 {p99_lag:,.0f} ms, max {worst:,.0f} ms.",
    ]
    if results.steal is not None:
        lines.append(
            f"CPU time the hypervisor gave to other guests during the rounds (steal): {results.steal:.1%}. "
            "Compare runs by their ratios: the absolute figures follow the machine."
        )
    return "\n".join(lines)


def chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    medians = [results.median(d, "rps") for d in DESIGNS]
    lows = [m - min(r.rps for r in results.rounds[d]) for d, m in zip(DESIGNS, medians, strict=True)]
    highs = [max(r.rps for r in results.rounds[d]) - m for d, m in zip(DESIGNS, medians, strict=True)]
    colors = ["#2b7a78", "#8d99ae", "#c9ada7", "#9a8c98"]
    left.bar(DESIGNS, medians, yerr=[lows, highs], capsize=4, color=colors)
    left.set_title("Reserve one unit of a hot SKU: requests/s")
    left.set_ylabel("requests/s (median, min-max whiskers)")
    for i, m in enumerate(medians):
        left.annotate(f"{m:,.0f}", (i, m), ha="center", va="bottom", xytext=(0, 3), textcoords="offset points")
    p99 = [results.median(d, "p99_ms") for d in DESIGNS]
    right.bar(DESIGNS, p99, color=colors)
    right.axhline(P99_TARGET_MS, color="#d62828", linestyle="--", linewidth=1, label=f"target {P99_TARGET_MS:g} ms")
    right.set_title("p99 latency (ms)")
    right.legend()
    fig.suptitle(
        f"wrk -t{THREADS} -c{CONNECTIONS}, {ROUNDS} rounds x {SECONDS} s, "
        f"{WORKERS} uvicorn workers, {os.cpu_count()} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def main() -> int:
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk; `make bench` installs it)", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        ws = workspace(stack)
        work, redis_url, database_url = ws.work, ws.redis_url, ws.database_url
        servers = "embedded valkey-server and PostgreSQL" if ws.embedded else "the given Redis and PostgreSQL"
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "STOCKHOLD_SHARDS": str(SHARDS),
            "STOCKHOLD_ACCESS_LOG": "false",
            "STOCKHOLD_REQUIRE_AUTH": "false",  # wrk sends no key: the figures stay comparable with earlier runs
        }
        script = wrk_script(work)
        env["BENCH_SKU"] = SKU
        os.environ["BENCH_SKU"] = SKU  # wrk reads it

        keys = KeySpace(SHARDS)
        redis = connect_redis(redis_url)
        pg = await create_pool(database_url, max_size=4)
        await apply_migrations(pg)
        await reset(redis, pg, keys)
        stockhold_port, peers_port = free_port(), free_port()
        bases = {d: f"http://127.0.0.1:{peers_port}" for d in DESIGNS}
        bases["stockhold"] = f"http://127.0.0.1:{stockhold_port}"
        serve = [sys.executable, "-m", "app.cli", "serve", "--port", str(stockhold_port), "--workers", str(WORKERS)]
        peers = [sys.executable, "-m", "uvicorn", "bench.peers:app", "--port", str(peers_port)]
        peers += ["--workers", str(WORKERS), "--no-access-log", "--log-level", "warning"]
        procs = [start(serve, env, work / "serve.log"), start(peers, env, work / "peers.log")]
        try:
            await wait_answering(bases["stockhold"] + "/readyz")
            await wait_answering(bases["trivial"] + "/docs")
            async with httpx.AsyncClient(base_url=bases["stockhold"], timeout=10) as client:
                sku = {"on_hand": STOCK, "hold_ttl_seconds": 900}
                (await client.put(f"/v1/skus/{SKU}", json=sku)).raise_for_status()
            await pg.execute("INSERT INTO peer_stock (sku, available) VALUES ($1, $2)", SKU, STOCK)
            print(f"servers: {servers}; stockhold at {bases['stockhold']}, peers at {bases['trivial']}", flush=True)

            for design in DESIGNS:  # warm up every server and pool, then forget the holds it made
                wrk(bases[design], design, WARMUP_SECONDS, script)
            results = Results()
            cpu_before = cpu_times()
            for n in range(ROUNDS):
                order = DESIGNS[n % len(DESIGNS) :] + DESIGNS[: n % len(DESIGNS)]  # rotate: no design always first
                for design in order:
                    before = await evalsha_totals(redis)
                    result = wrk(bases[design], design, SECONDS, script)
                    if design == "stockhold":
                        calls, usec = (a - b for a, b in zip(await evalsha_totals(redis), before, strict=True))
                        results.redis_us.append(usec / max(calls, 1))
                    results.rounds[design].append(result)
                    print(
                        f"round {n + 1} {design:9} {result.rps:9,.0f} req/s  p50 {result.p50_ms:6.1f} ms  "
                        f"p99 {result.p99_ms:6.1f} ms  failed {result.failed}",
                        flush=True,
                    )
                    if result.failed:
                        print(f"  {design}: {result.failed} requests failed (non-2xx or socket errors)", flush=True)
            results.steal = steal_share(cpu_before, cpu_times())
            drained_s = await wait_drained(redis, keys, timeout_s=300)
            lag = await pg.fetchrow(
                "SELECT count(*) AS n, percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS p50, "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) AS p99, max(lag) AS max FROM ("
                "SELECT extract(epoch FROM recorded_at - occurred_at) * 1000 AS lag FROM stock_movement "
                "WHERE kind = 'held') AS held"
            )
            assert lag is not None  # an aggregate always returns its one row
            results.lag_ms = (float(lag["p50"]), float(lag["p99"]), float(lag["max"]))
            print(
                f"write-behind (worker in each API process): backlog drained {drained_s:.1f} s after the last "
                f"round; lag of {lag['n']:,} holds: p50 {lag['p50']:.0f} ms, p99 {lag['p99']:.0f} ms, "
                f"max {lag['max']:.0f} ms",
                flush=True,
            )
            # the load-test audit, against the service still serving: nothing oversold, Redis and
            # PostgreSQL agree, every hold persisted
            audit = [sys.executable, "-m", "loadtests.audit", "--url", bases["stockhold"], "--skus", SKU]
            audit += ["--database-url", database_url, "--redis-url", redis_url]
            audited = run_audit(audit)
            print(audited.stdout + audited.stderr, flush=True)
        finally:
            for proc in procs:
                stop_process(proc)
        results.redis_us_quiet = await redis_time_alone(redis, pg, keys)

        table = report(results, servers)
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        (RESULTS / f"hotpath-{stamp}.md").write_text(table + "\n")
        chart(results, RESULTS / f"hotpath-{stamp}.png")
        print("\n" + table + f"\n\nwritten: bench/results/hotpath-{stamp}.md and .png", flush=True)
        failed = sum(r.failed for rounds in results.rounds.values() for r in rounds)
        await redis.aclose()
        await pg.close()
        return 1 if failed or audited.returncode else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
