"""Fixtures for the load scenarios' tests: the suite's real Redis and PostgreSQL, a real `stockhold serve`
on them, and the runner and audit run as the commands people type (subprocesses, bounded in time)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SHARDS, Servers
from tests.processes import REPO, stockhold_serve


@pytest.fixture
def service_env(servers: Servers) -> dict[str, str]:
    """The environment `stockhold serve` and the runner get: the suite's servers, nothing of a run's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_LOADTEST")}
    env.update(REDIS_URL=servers.redis_url, DATABASE_URL=servers.database_url, STOCKHOLD_SHARDS=str(SHARDS))
    env["STOCKHOLD_REQUIRE_AUTH"] = "false"  # the scenarios send no key
    return env


@pytest.fixture
def server(service_env: dict[str, str], redis: object, pg: object, tmp_path: Path) -> Iterator[str]:
    """`stockhold serve --workers 2` on a flushed Redis and an emptied PostgreSQL; yields its URL."""
    with stockhold_serve(service_env, tmp_path / "server.log") as base:
        yield base


def run_module(module: str, args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` from the repository, output captured. Past the timeout it gets Ctrl-C
    (the runner then stops the Locust and server processes it started) and, should that hang, a kill."""
    cmd = [sys.executable, "-m", module, *args]
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            pytest.fail(f"{' '.join(cmd)} did not finish in {timeout_s:g} s:\n{out}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")
