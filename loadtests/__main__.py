"""The runner: one scenario, headless and bounded in time, then the audit. `make loadtest SCENARIO=...`.

    python -m loadtests last-bottle                       # starts `stockhold serve --workers 2` itself
    python -m loadtests flash-100 --url http://127.0.0.1:8000 --database-url postgresql://...
    python -m loadtests flash-100 --users 1500 --confirm-all --set scalper.pay_margin_s=8
    python -m loadtests flash-100 --replicas 3 --workers 2 [--kill-worker]   # see loadtests/deployment.py
    python -m loadtests --list

Without --url, the service is started on a free 127.0.0.1 port, against REDIS_URL / DATABASE_URL when
set or embedded servers otherwise, and stopped at the end. With --replicas N, N separate `stockhold serve`
processes and --workers M separate `stockhold worker` processes instead, the users spread over the N
replicas, and the audit also proves what loadtests/deployment.py says. With --url, the audit needs the service's
PostgreSQL (--database-url or DATABASE_URL; --redis-url or REDIS_URL adds reconcile's comparison).

Everything the run produced lands in loadtests/results/<scenario>-<run id>/ (or --results-dir): Locust's
report.html and CSVs, locust.log, outcomes.json, stats.json, scenario.json, audit.txt, and server.log
when the service was started here. Exit code 0 if Locust ran cleanly and every audited check passed; 1 if
a check failed (or Locust broke); 2 if the run could not be set up or audited at all.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.exceptions import RedisError

from loadtests.audit import run_audit
from loadtests.deployment import (
    DEFAULT_CLAIM_IDLE_MS,
    Deployment,
    finish,
    kill_worker_mid_sale,
    persistence_checks,
    replica_traffic,
    started_deployment,
)
from loadtests.locust_process import figures_table, read_figures, run_locust
from loadtests.outcomes import Outcomes
from loadtests.scenarios import OUTCOMES_FILE, SCENARIOS, Run, Scenario, parse_setting, with_overrides
from loadtests.service import Service, create_skus, new_run_id, started_service

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS), help="what to run")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--url", help="a running service (default: start one)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"), help="[DATABASE_URL]")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="[REDIS_URL]")
    parser.add_argument("--users", type=int, help="override the number of users")
    parser.add_argument("--spawn-rate", type=float, help="override users arriving per second")
    parser.add_argument("--units", type=int, help="override on_hand per SKU")
    parser.add_argument("--run-time", type=int, help="override the load phase's bound, seconds")
    parser.add_argument(
        "--confirm-all", action="store_true", help="every buyer pays, every scalper pays at the last moment"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any scenario setting, e.g. buyer.confirm_p=1"
    )
    parser.add_argument("--results-dir", type=Path, help="where to write (default: loadtests/results/<name>-<id>)")
    parser.add_argument("--settle-timeout", type=float, default=60.0, help="audit: seconds to await consistency")
    parser.add_argument(
        "--replicas", type=int, help="start N separate API processes (stockhold serve) instead of one serve --workers 2"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="with --replicas: separate write-behind workers (default 2)"
    )
    parser.add_argument(
        "--kill-worker", action="store_true", help="with --replicas: kill -9 a worker mid-sale (it holds entries)"
    )
    parser.add_argument(
        "--claim-idle-ms",
        type=int,
        default=DEFAULT_CLAIM_IDLE_MS,
        help="with --replicas: the workers take over entries left unacknowledged this long (stockhold worker's)",
    )
    args = parser.parse_args(argv)
    if not args.list and not args.scenario:
        parser.error("a scenario is required (or --list)")
    if args.url and not args.database_url:
        parser.error("with --url the audit needs the service's PostgreSQL: --database-url or DATABASE_URL")
    if args.replicas is not None and (args.url or args.replicas < 1 or args.workers < 1):
        parser.error("--replicas starts its own deployment (no --url), of at least one replica and one worker")
    if args.kill_worker and (args.replicas is None or args.workers < 2):
        parser.error("--kill-worker needs --replicas and --workers 2 or more: another worker must take over")
    return args


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    overrides: dict[str, Any] = dict(parse_setting(s) for s in args.set)
    flags = {"users": "users", "spawn_rate": "spawn_rate", "units": "on_hand", "run_time": "run_time_s"}
    overrides.update({key: getattr(args, flag) for flag, key in flags.items() if getattr(args, flag) is not None})
    if args.confirm_all:
        overrides.update({"buyer.confirm_p": 1.0, "scalper.pay_p": 1.0})
    scenario = with_overrides(SCENARIOS[args.scenario], overrides)
    if args.spawn_rate is None and args.users is not None:
        # fewer users than the scenario's arrival rate: they all arrive at once, as the scenario means
        scenario = dataclasses.replace(scenario, spawn_rate=min(scenario.spawn_rate, scenario.users))
    return scenario


def run(args: argparse.Namespace) -> int:
    scenario = scenario_from_args(args)
    run_id = new_run_id()
    folder = args.results_dir or RESULTS / f"{scenario.name}-{run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scenario.json").write_text(json.dumps(dataclasses.asdict(scenario), indent=1))
    print(f"{scenario.name}: {scenario.summary}")
    print(f"  {scenario.users} users at {scenario.spawn_rate:g}/s, at most {scenario.run_time_s} s")
    print(f"  results in {folder}")
    with ExitStack() as stack:
        deployment = None
        if args.url:
            service = Service(args.url.rstrip("/"), args.database_url, args.redis_url)
        elif args.replicas is not None:
            print(f"  starting {args.replicas} x stockhold serve and {args.workers} x stockhold worker ...", flush=True)
            try:
                deployment = stack.enter_context(
                    started_deployment(folder, args.replicas, args.workers, args.claim_idle_ms)
                )
            except RuntimeError as exc:
                print(f"the deployment did not start: {exc}")
                return 2
            service = deployment.service
            print(f"  replicas {', '.join(deployment.urls)}; workers {', '.join(w.name for w in deployment.workers)}")
        else:
            print("  starting stockhold serve --workers 2 ...", flush=True)
            service = stack.enter_context(started_service(folder / "server.log"))
        # the audit reads the service too: it runs before the service started here is stopped
        return load_and_audit(service, scenario, run_id, folder, args.settle_timeout, deployment, args.kill_worker)
    raise AssertionError("unreachable")


def load_and_audit(
    service: Service,
    scenario: Scenario,
    run_id: str,
    folder: Path,
    settle_timeout_s: float,
    deployment: Deployment | None = None,
    kill_worker: bool = False,
) -> int:
    try:
        skus = create_skus(service.url, scenario, run_id)
    except (httpx.HTTPError, RuntimeError) as exc:
        print(f"cannot set the scenario's SKUs up on {service.url}: {exc}")
        return 2
    print(f"  service {service.url}; SKUs: {', '.join(skus)}", flush=True)
    hosts = deployment.urls if deployment else []
    killer = kill_worker_mid_sale(deployment, skus) if deployment and kill_worker else None
    locust = run_locust(Run(scenario, run_id, skus, str(folder), hosts=hosts), service.url, folder)
    if killer is not None:
        killer.join(timeout=60)
    print(_locust_summary(locust.exit_code, locust.seconds, locust.log))
    print(figures_table(read_figures(folder)))
    outcomes_path = folder / OUTCOMES_FILE
    if not outcomes_path.exists():
        print(f"no outcomes written: see {locust.log}")
        return 2
    assert service.database_url, "checked by parse_args, or set by started_service"
    try:
        report = asyncio.run(
            run_audit(
                service.url,
                service.database_url,
                skus,
                redis_url=service.redis_url,
                outcomes=Outcomes.load(outcomes_path),
                settle_timeout_s=settle_timeout_s,
            )
        )
        if deployment is not None:
            outcomes = Outcomes.load(outcomes_path)
            replica_traffic(report, deployment, outcomes)
            persistence_checks(report, deployment, finish(deployment, "default", skus))
    except (httpx.HTTPError, asyncpg.PostgresError, RedisError, OSError) as exc:
        print(f"the audit could not read the service, Redis or PostgreSQL: {type(exc).__name__}: {exc}")
        return 2
    text = report.text()
    (folder / "audit.txt").write_text(text + "\n")
    print(f"\n{text}\n\nreport: {locust.html}\ncsv:    {locust.stats_csv}")
    return 0 if report.passed and locust.clean else 1


def _locust_summary(code: int | None, seconds: float, log: Path) -> str:
    if code is None:
        return f"\nLocust outlived its time bound and was killed after {seconds:.0f} s: see {log}"
    status = "ran cleanly" if code == 0 else f"exited with {code}: see {log}"
    return f"\nLocust {status} in {seconds:.1f} s"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds the run: Locust and the started service are stopped on the way out


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse_args(argv)
    if args.list:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:16} {scenario.summary}")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
