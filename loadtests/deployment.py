"""Many replicas (issue 7): N separate `stockhold serve` processes and M separate `stockhold worker`
processes on one Redis and one PostgreSQL, as a deployment runs them, and what a run on them must prove
beside the audit.

    python -m loadtests flash-100 --replicas 3 --workers 2
    python -m loadtests flash-100 --replicas 3 --workers 2 --kill-worker    # kill -9 a worker mid-sale

Each replica is its own `serve` on its own 127.0.0.1 port with STOCKHOLD_WORKER_IN_PROCESS=false (no
supervisor shares anything between them); each worker is its own `stockhold worker`, the workers sharing
the write-behind consumer group. The Locust users are spread over the replicas' URLs in turn.

Before anything runs, an audit consumer group is created on every shard stream. Streams are trimmed only
below what every group acknowledged (app/worker/backlog.py), and this group acknowledges nothing, so every
event of the run stays in its stream until the end: the run's events can then be matched one for one
against PostgreSQL's ledger (stock_movement, one row per event id). The group is destroyed at the end; a
run killed before that leaves it on a Redis given by REDIS_URL, where it stops trimming until the next run
resets it or `XGROUP DESTROY <stream> loadtest-audit` drops it.

After the audit (which needs the replicas), the checks here:

- every replica served traffic: the users' requests per replica, and the POSTs each replica's own
  access log shows (between those answered and those sent);
- every event persisted exactly once: once the replicas are stopped and the workers have drained the
  streams, the run's SKUs' stream entries and ledger rows are the same set of event ids (none lost,
  none extra, none twice), and, when no worker was killed, the entries the workers acknowledged add up
  to the streams' entries (each entry handled by one worker of the group, none by two);
- with --kill-worker: a worker frozen (SIGSTOP) until it holds delivered, unacknowledged entries, then
  killed (SIGKILL) mid-sale; the other must take those entries over (XAUTOCLAIM after --claim-idle-ms)
  and persist them: at the end none is pending on the dead consumer and each is in the ledger.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import asyncpg
import httpx

from loadtests.audit import Report
from loadtests.outcomes import Outcomes
from loadtests.processes import free_port, stop_process
from loadtests.service import READY_TIMEOUT_S, REPO, STOP_TIMEOUT_S, Service, wait_ready

T = TypeVar("T")
AUDIT_GROUP = "loadtest-audit"  # keeps every event of the run in its stream until the end (see above)
PERSISTING_GROUP = "stockhold-writer"  # app/worker/backlog.py's, the workers' group
DEFAULT_CLAIM_IDLE_MS = 2_000  # a killed worker's entries are taken over within this + the 5 s reclaim period
DRAIN_TIMEOUT_S = 60.0
# `stockhold worker`'s last line (app/cli.py)
STOPPED_LINE = re.compile(r"write-behind worker (\S+) stopped: (\d+) entries acknowledged, (\d+) new ledger rows")
# uvicorn's access log line for a POST, as each replica writes it with STOCKHOLD_ACCESS_LOG=true: as text, or
# inside a JSON record (STOCKHOLD_LOG_FORMAT=json, the default), where its quotes are escaped
ACCESS_POST = re.compile(r'\\?"POST /\S* HTTP/[0-9.]+\\?" \d{3}')


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""  # a replica's base URL


@dataclass
class Kill:
    """What --kill-worker did: the worker killed and the entries it held delivered but unacknowledged."""

    worker: str = ""
    pending: list[tuple[str, str]] = field(default_factory=list)  # (stream, entry id)
    tries: int = 0
    at_s: float = 0.0  # seconds after the sale started
    taken_over_s: float | None = None  # seconds from the kill until nothing was pending on it any more
    error: str = ""


@dataclass
class Deployment:
    service: Service  # the first replica's URL: the SKUs' set-up, the monitor and the audit read it
    replicas: list[Process]
    workers: list[Process]
    shards: int
    started_backlog: int  # events waiting for PostgreSQL when the run began (0 on a fresh Redis)
    kill: Kill | None = None

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def redis_url(self) -> str:
        assert self.service.redis_url
        return self.service.redis_url

    @property
    def database_url(self) -> str:
        assert self.service.database_url
        return self.service.database_url


def _on_redis(url: str, body: Callable[[Any], Awaitable[T]]) -> T:
    """Runs `body(redis)` on a fresh client (this module's few Redis calls are made from sync code)."""
    from app.store.redis import connect_redis

    async def main() -> T:
        redis = connect_redis(url, pool_size=2)
        try:
            return await body(redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


def _streams(shards: int) -> list[str]:
    from app.stock.keys import KeySpace

    keys = KeySpace(shards)
    return [keys.events(s) for s in keys.all_shards()]


async def _backlog(redis: Any, shards: int) -> int:
    from app.stock.keys import KeySpace
    from app.worker.backlog import read_backlog

    return sum(b.unpersisted for b in await read_backlog(redis, KeySpace(shards)))


def _create_audit_group(redis_url: str, shards: int) -> int:
    """The audit group on every stream, at its end ("$": what is already there is not this run's);
    returns the backlog the run starts with."""
    from redis.exceptions import ResponseError

    async def body(redis: Any) -> int:
        for stream in _streams(shards):
            try:
                await redis.xgroup_create(stream, AUDIT_GROUP, id="$", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                await redis.xgroup_setid(stream, AUDIT_GROUP, id="$")  # an earlier run's, left behind
        return await _backlog(redis, shards)

    return _on_redis(redis_url, body)


def _destroy_audit_group(redis_url: str, shards: int) -> None:
    async def body(redis: Any) -> None:
        for stream in _streams(shards):
            await redis.xgroup_destroy(stream, AUDIT_GROUP)

    _on_redis(redis_url, body)


def _wait_consumer(redis_url: str, shards: int, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the worker has read its group once (it is then a consumer of the group on every stream)."""
    first = _streams(shards)[0]

    async def body(redis: Any) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if any(c["name"] == name for c in await redis.xinfo_consumers(first, PERSISTING_GROUP)):
                    return
            except Exception:  # the group does not exist yet
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"stockhold worker {name} exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"stockhold worker {name} did not start reading in {READY_TIMEOUT_S:g} s; see {log}")
            await asyncio.sleep(0.2)

    _on_redis(redis_url, body)


@contextmanager
def started_deployment(
    folder: Path, replicas: int = 3, workers: int = 2, claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS
) -> Iterator[Deployment]:
    """`replicas` API processes and `workers` write-behind workers on one Redis and one PostgreSQL (REDIS_URL /
    DATABASE_URL, or embedded servers started here); everything stopped by its own handle at the end."""
    with ExitStack() as stack:
        env = dict(os.environ)
        redis_url, database_url = env.get("REDIS_URL"), env.get("DATABASE_URL")
        if not redis_url or not database_url:
            from app.store.embedded import start_missing

            warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")
            data = Path(tempfile.mkdtemp(prefix="stockhold-loadtest-"))
            stack.callback(shutil.rmtree, data, ignore_errors=True)
            redis_url, database_url = start_missing(stack, data, redis_url, database_url)
        from app.config import Settings

        shards = int(env.get("STOCKHOLD_SHARDS") or Settings.model_fields["shard_count"].default)
        env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, STOCKHOLD_REQUIRE_AUTH="false")
        # replicas only serve: the separate workers persist; each replica logs its requests (counted per replica)
        env.update(STOCKHOLD_WORKER_IN_PROCESS="false", STOCKHOLD_ACCESS_LOG="true")
        backlog = _create_audit_group(redis_url, shards)
        stack.callback(_destroy_audit_group, redis_url, shards)  # after the workers stopped (LIFO)

        started: list[Process] = []
        for i in range(1, workers + 1):
            name = f"loadtest-worker-{i}"
            cmd = [sys.executable, "-m", "app.cli", "worker", "--name", name, "--claim-idle-ms", str(claim_idle_ms)]
            started.append(_start(stack, name, cmd, env, folder / f"worker-{i}.log"))
        for i in range(1, replicas + 1):
            port = free_port()
            cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            replica = _start(stack, f"replica-{i}", cmd, env, folder / f"replica-{i}.log")
            replica.url = f"http://127.0.0.1:{port}"
            started.append(replica)
        for p in started:  # started together, awaited in turn: the start-ups overlap
            if p.url:
                wait_ready(p.url, p.proc, p.log)
            else:
                _wait_consumer(redis_url, shards, p.name, p.proc, p.log)
        api = [p for p in started if p.url]
        yield Deployment(
            Service(api[0].url, database_url, redis_url),
            api,
            [p for p in started if not p.url],
            shards,
            backlog,
        )


def _start(stack: ExitStack, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> Process:
    log = stack.enter_context(log_path.open("wb"))  # a file, not a pipe: an unread pipe blocks the process
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log)
    stack.callback(stop_process, proc, STOP_TIMEOUT_S)
    return Process(name, proc, log_path)


# -- kill -9 a worker mid-sale ---------------------------------------------------------------------------


def kill_worker_mid_sale(deployment: Deployment, skus: list[str], timeout_s: float = 60.0) -> threading.Thread:
    """In the background: once the sale has begun (a run SKU holds or sold something), freezes the first
    worker until it holds delivered, unacknowledged entries (what a crash mid-batch leaves), then SIGKILLs
    it. Frozen, it cannot acknowledge: entries Redis hands it meanwhile (it is usually blocked in
    XREADGROUP) or it was persisting stay pending on it. Result in deployment.kill."""
    victim = deployment.workers[0]
    kill = deployment.kill = Kill(worker=victim.name)

    def pending(redis: Any) -> Awaitable[list[tuple[str, str]]]:
        async def read() -> list[tuple[str, str]]:
            found = []
            for stream in _streams(deployment.shards):
                rows = await redis.xpending_range(stream, PERSISTING_GROUP, "-", "+", 10_000, victim.name)
                found += [(stream, str(r["message_id"])) for r in rows]
            return found

        return read()

    def sale_started(http: httpx.Client) -> bool:
        for sku in skus:
            response = http.get(f"/v1/skus/{quote(sku)}")
            if response.status_code == 200 and (response.json()["held"] or response.json()["sold"]):
                return True
        return False

    def run() -> None:
        deadline = time.monotonic() + timeout_s
        try:
            with httpx.Client(base_url=deployment.urls[-1], timeout=5) as http:
                while not sale_started(http):
                    if time.monotonic() > deadline:
                        kill.error = "the sale never started"
                        return
                    time.sleep(0.1)
            began = time.monotonic()
            while time.monotonic() < deadline:
                kill.tries += 1
                os.kill(victim.proc.pid, signal.SIGSTOP)
                time.sleep(0.5)
                held = _on_redis(deployment.redis_url, pending)
                if held:
                    victim.proc.kill()  # SIGKILL, by its PID: no clean-up, no XACK
                    victim.proc.wait()
                    killed = time.monotonic()
                    kill.pending, kill.at_s = held, killed - began
                    while time.monotonic() < deadline + timeout_s:  # the survivor claims them, after claim_idle_ms
                        if not _on_redis(deployment.redis_url, pending):
                            kill.taken_over_s = time.monotonic() - killed
                            return
                        time.sleep(0.2)
                    return
                os.kill(victim.proc.pid, signal.SIGCONT)
                time.sleep(0.05 * kill.tries)
            kill.error = f"{victim.name} held no pending entry in {kill.tries} freezes"
        except Exception as exc:
            kill.error = f"{type(exc).__name__}: {exc}"
        finally:
            if victim.proc.poll() is None:
                os.kill(victim.proc.pid, signal.SIGCONT)

    thread = threading.Thread(target=run, name="kill-worker", daemon=True)
    thread.start()
    return thread


# -- after the audit -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Persistence:
    stream_entries: int  # every shard stream's entries since the run began
    run_events: set[tuple[int, str]]  # (shard, event id) of the run's SKUs, from the streams
    ledger_rows: int  # stock_movement rows of the run's SKUs
    ledger_events: set[tuple[int, str]]
    acknowledged: dict[str, int | None]  # per worker (None: killed, or no stop line)
    dead_pending: list[tuple[str, str]]  # entries still pending on the killed worker
    dead_unpersisted: list[tuple[str, str]]  # of those it held when killed: not in the ledger
    backlog_left: int


def finish(deployment: Deployment, tenant: str, skus: list[str]) -> Persistence:
    """Stops the replicas (no more events), lets the workers drain the streams, stops them, and reads what
    each side holds: the streams (kept whole by the audit group) and the ledger."""
    for replica in deployment.replicas:
        stop_process(replica.proc, STOP_TIMEOUT_S)
    shards = deployment.shards

    async def drained(redis: Any) -> int:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            left = await _backlog(redis, shards)
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.5)

    left = _on_redis(deployment.redis_url, drained)
    for worker in deployment.workers:
        stop_process(worker.proc, STOP_TIMEOUT_S)
    acknowledged: dict[str, int | None] = {}
    for worker in deployment.workers:
        found = STOPPED_LINE.search(worker.log.read_text(errors="replace"))
        acknowledged[worker.name] = int(found.group(2)) if found else None

    victim = deployment.kill.worker if deployment.kill else None

    async def streams(redis: Any) -> tuple[int, set[tuple[int, str]], list[tuple[str, str]]]:
        total, run, dead = 0, set(), []
        wanted = set(skus)
        for shard, stream in enumerate(_streams(shards)):
            # the audit group's last delivered id is where the run began; it read nothing since
            groups = await redis.xinfo_groups(stream)
            start = next(str(g["last-delivered-id"]) for g in groups if g["name"] == AUDIT_GROUP)
            for entry_id, fields in await redis.xrange(stream, min=f"({start}", max="+"):
                total += 1
                if fields.get("tenant") == tenant and fields.get("sku") in wanted:
                    run.add((shard, str(entry_id)))
            if victim:
                rows = await redis.xpending_range(stream, PERSISTING_GROUP, "-", "+", 10_000, victim)
                dead += [(stream, str(r["message_id"])) for r in rows]
        return total, run, dead

    total, run_events, dead_pending = _on_redis(deployment.redis_url, streams)

    async def ledger() -> tuple[int, set[tuple[int, str]]]:
        conn = await asyncpg.connect(deployment.database_url)
        try:
            rows = await conn.fetch(
                "SELECT shard, event_id FROM stock_movement WHERE tenant = $1 AND sku = ANY($2::text[])", tenant, skus
            )
        finally:
            await conn.close()
        return len(rows), {(int(r["shard"]), str(r["event_id"])) for r in rows}

    ledger_rows, ledger_events = asyncio.run(ledger())
    shard_of = {stream: shard for shard, stream in enumerate(_streams(shards))}
    held = deployment.kill.pending if deployment.kill else []
    unpersisted = [(s, i) for s, i in held if (shard_of[s], i) not in ledger_events]
    # a held entry of another SKU (set-up) is not in the run's ledger rows: only the run's are checked
    unpersisted = [(s, i) for s, i in unpersisted if (shard_of[s], i) in run_events]
    return Persistence(total, run_events, ledger_rows, ledger_events, acknowledged, dead_pending, unpersisted, left)


def replica_traffic(report: Report, deployment: Deployment, outcomes: Outcomes) -> None:
    """Per replica: the users' requests to it, and the POSTs its own access log saw."""
    problems, lines = [], []
    for i, replica in enumerate(deployment.replicas, 1):
        url = replica.url
        sent, answered = outcomes.sent.get(url, 0), outcomes.answered.get(url, 0)
        sent_posts, answered_posts = outcomes.sent.get(f"POST {url}", 0), outcomes.answered.get(f"POST {url}", 0)
        logged = len(ACCESS_POST.findall(replica.log.read_text(errors="replace")))
        lines.append(
            f"  replica {i} {url}: users sent {sent} requests ({answered} answered), POST {sent_posts}"
            f" ({answered_posts} answered); its access log: {logged} POST"
        )
        if not answered:
            problems.append(f"replica {i} ({url}) answered no user request")
        if not answered_posts <= logged <= sent_posts:
            problems.append(f"replica {i} logged {logged} POSTs, users sent {sent_posts}, {answered_posts} answered")
    report.facts += ["requests per replica:", *lines]
    total = sum(outcomes.answered.get(r.url, 0) for r in deployment.replicas)
    report.add(
        f"every replica served traffic ({len(deployment.replicas)} replicas)",
        problems,
        f"{total} answered user requests spread over {len(deployment.replicas)} replicas, each seen in its access log",
    )


def persistence_checks(report: Report, deployment: Deployment, p: Persistence) -> None:
    workers = ", ".join(f"{name} {'killed' if n is None else n}" for name, n in p.acknowledged.items())
    report.facts.append(
        f"events: {p.stream_entries} stream entries since the run began, {len(p.run_events)} of the run's SKUs;"
        f" ledger rows of the run's SKUs: {p.ledger_rows} ({len(p.ledger_events)} distinct event ids)"
    )
    report.facts.append(f"entries acknowledged per worker: {workers}")
    lost = sorted(p.run_events - p.ledger_events)
    extra = sorted(p.ledger_events - p.run_events)
    problems = [f"shard {s} event {i} not in the ledger" for s, i in lost[:3]]
    problems += [f"ledger row for shard {s} event {i}, which no stream holds" for s, i in extra[:3]]
    if len(lost) > 3 or len(extra) > 3:
        problems.append(f"{len(lost)} lost, {len(extra)} extra in all")
    if p.ledger_rows != len(p.ledger_events):
        problems.append(f"{p.ledger_rows - len(p.ledger_events)} events persisted twice")
    if p.backlog_left:
        problems.append(f"{p.backlog_left} events still waiting for PostgreSQL after {DRAIN_TIMEOUT_S:g} s")
    counts = [n for n in p.acknowledged.values() if n is not None]
    killed = deployment.kill is not None and not deployment.kill.error
    if not killed and len(counts) == len(p.acknowledged) and deployment.started_backlog == 0:
        if sum(counts) != p.stream_entries:
            problems.append(f"workers acknowledged {sum(counts)} entries, the streams hold {p.stream_entries}")
        handled = f"; the workers acknowledged {' + '.join(map(str, counts))} = {sum(counts)} = the streams' entries"
    else:
        handled = ""
    report.add(
        f"every event persisted exactly once ({len(deployment.workers)} workers, one consumer group)",
        problems,
        f"the run's {len(p.run_events)} stream events are the ledger's {p.ledger_rows} rows, one for one{handled}",
    )
    kill = deployment.kill
    if kill is None:
        return
    report.facts.append(
        f"{kill.worker}: killed (SIGKILL) {kill.at_s:.1f} s into the sale holding {len(kill.pending)}"
        f" unacknowledged entries (after {kill.tries} freeze(s)); the other worker had taken them over "
        + (
            f"{kill.taken_over_s:.1f} s later"
            if kill.taken_over_s is not None
            else "(not seen while the kill was watched)"
        )
        if not kill.error
        else f"{kill.worker}: not killed: {kill.error}"
    )
    problems = [kill.error] if kill.error else []
    if p.dead_pending:
        problems.append(f"{len(p.dead_pending)} entries still pending on the killed {kill.worker}")
    problems += [f"{stream} {entry} it held is not in the ledger" for stream, entry in p.dead_unpersisted[:3]]
    report.add(
        "a killed worker's entries taken over",
        problems,
        f"the {len(kill.pending)} entries {kill.worker} held when killed were claimed by the other worker and"
        " persisted; none is left pending on it",
    )
