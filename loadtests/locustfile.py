"""Locust entry point: `python -m locust -f loadtests/locustfile.py --host URL Buyer Scalper ...`.

The run (scenario, SKUs, where to write outcomes) comes as JSON in STOCKHOLD_LOADTEST; the runner
(`python -m loadtests`) sets it, and sets Locust's users, spawn rate, run time and user classes from
the same scenario. When the test stops, what the users saw is written to the outcomes file for the audit.

A monitor ends the test early once nothing more can happen: every one-journey user has finished, or
(flash sales) every unit is sold, after which users take no further step and the crowd drains.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import gevent
from geventhttpclient import HTTPClient
from geventhttpclient.client import HTTPClientPool
from locust import events
from locust.runners import STATE_RUNNING

from loadtests.scenarios import ENV_VAR, OUTCOMES_FILE, STATS_FILE, Run
from loadtests.users import Browser, Buyer, Merchant, Scalper, Shared, StockholdUser

__all__ = ["Browser", "Buyer", "Merchant", "Scalper"]  # the user classes Locust finds here

log = logging.getLogger("loadtests")
MONITOR_INTERVAL_S = 0.5
JOURNEY_CLASSES = {Buyer.__name__, Scalper.__name__}  # browsers and the merchant go on until the end

RUN = Run.from_json(os.environ[ENV_VAR])
SHARED = Shared(RUN)
StockholdUser.shared = SHARED
if RUN.scenario.connections:
    StockholdUser.client_pool = HTTPClientPool(
        concurrency=RUN.scenario.connections,
        network_timeout=StockholdUser.network_timeout,
        connection_timeout=StockholdUser.connection_timeout,
    )
weights = RUN.scenario.weights
Buyer.weight, Scalper.weight, Browser.weight = weights.buyer, weights.scalper, weights.browser


def _sold_out(client: HTTPClient) -> bool:
    """Every SKU of the run has sold all it had, nothing is held: only refusals can follow."""
    for sku in RUN.skus:
        response = client.get(f"/v1/skus/{quote(sku)}")
        if response.status_code != 200:
            return False
        state = json.loads(response.read())
        if state["held"] != 0 or state["sold"] < state["on_hand"] - state["safety_stock"]:
            return False
    return True


def _monitor(environment: Any) -> None:
    client = HTTPClient.from_url(environment.host, concurrency=1, network_timeout=5, connection_timeout=5)
    scenario = RUN.scenario
    try:
        while True:
            gevent.sleep(MONITOR_INTERVAL_S)
            if scenario.stop_when_sold_out and not SHARED.halt.is_set():
                try:
                    if _sold_out(client):
                        log.info("every unit sold: users take no further step")
                        SHARED.halt.set()
                except Exception as exc:  # a busy service may not answer the monitor in time: ask again
                    log.debug("monitor read failed: %r", exc)
            runner = environment.runner
            # RUNNING: every user has been spawned (parked users are never stopped, so the counts hold)
            journeys = sum(n for name, n in runner.user_classes_count.items() if name in JOURNEY_CLASSES)
            if runner.state == STATE_RUNNING and not scenario.repeat and SHARED.finished >= journeys > 0:
                log.info("every user finished its journey: stopping")
                environment.runner.quit()
                return
    finally:
        client.close()


def _on_test_start(environment: Any, **_: Any) -> None:
    gevent.spawn(_monitor, environment)


def _on_test_stopping(**_: Any) -> None:
    SHARED.halt.set()
    SHARED.stopping.set()


def _on_test_stop(environment: Any, **_: Any) -> None:
    # users are stopped by now (killed after --stop-timeout at the latest): the counts are final
    folder = Path(RUN.results_dir)
    SHARED.outcomes.save(
        folder / OUTCOMES_FILE, {"run_id": RUN.run_id, "scenario": RUN.scenario.name, "skus": RUN.skus}
    )
    stats = environment.stats
    rows = [_figures(stats.entries[key]) for key in sorted(stats.entries)] + [_figures(stats.total)]
    (folder / STATS_FILE).write_text(json.dumps(rows, indent=1))
    log.info("outcomes and figures written to %s", folder)


def _figures(entry: Any) -> dict[str, Any]:
    """One request name's final figures (milliseconds), as Locust computes them for its own report."""
    per_second = entry.num_reqs_per_sec.values()
    return {
        "name": entry.name,
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": round(entry.total_rps, 1),  # over the whole run, from the first request to the last
        "peak_rps": max(per_second, default=0),  # the busiest second
        **{f"p{p}": entry.get_response_time_percentile(p / 100) for p in (50, 95, 99)},
        "max": round(entry.max_response_time),
    }


events.test_start.add_listener(_on_test_start)  # type: ignore[no-untyped-call]
events.test_stopping.add_listener(_on_test_stopping)  # type: ignore[no-untyped-call]
events.test_stop.add_listener(_on_test_stop)  # type: ignore[no-untyped-call]
