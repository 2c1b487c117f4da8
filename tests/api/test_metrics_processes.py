"""The metrics and logs of a real `stockhold serve --workers 2`: a scrape of either process answers the
totals of both (prometheus-client's multiprocess mode, in the directory `serve` makes), and the log is
one JSON object a line, each request's lines carrying its X-Request-ID. The server is started and
stopped by PID (tests/processes.py), on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Servers
from tests.processes import stockhold_serve

# serve's own words before the workers start (typer.echo on stdout, not log records)
BANNER = ("embedded ", "stockhold on http://", "API keys required", "WARNING: API keys NOT required")


@pytest.fixture
def served(servers: Servers, redis: object, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    env = {
        **os.environ,
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        "STOCKHOLD_SHARDS": "16",
        "STOCKHOLD_REQUIRE_AUTH": "false",
        "STOCKHOLD_ACCESS_LOG": "true",  # a line per request, to see which process answered it
        "STOCKHOLD_LOG_FORMAT": "json",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # serve makes its own
    log = tmp_path / "server.log"
    with stockhold_serve(env, log, workers=2) as base:
        yield base, log


def log_records(log: Path) -> list[dict[str, Any]]:
    records = []
    for line in log.read_text().splitlines():
        if not line or line.startswith(BANNER):
            continue
        record = json.loads(line)  # any other line that is not one JSON object fails here
        assert isinstance(record, dict), line
        records.append(record)
    return records


def answered_by(log: Path) -> dict[str, int]:
    """request id -> pid of the process whose access log line carries it."""
    return {r["request_id"]: r["pid"] for r in log_records(log) if r["logger"] == "uvicorn.access" and r["request_id"]}


def fresh_connections() -> httpx.AsyncClient:
    # no keep-alive: each request is a new connection, which either process may accept
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=30)


def reservations_total(text: str) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "stockhold_reservations_total"
    }


async def test_a_scrape_of_either_process_answers_the_totals_of_both(served: tuple[str, Path]) -> None:
    base, log = served
    async with fresh_connections() as http:
        assert (await http.put(f"{base}/v1/skus/tea", json={"on_hand": 10_000})).status_code == 201

        # given reservations until both processes have answered some
        sent = 0
        for round_ in range(10):

            async def buy(i: int, r: int = round_) -> None:
                rid = f"buy-{r}-{i}"
                body = {"user_id": f"u{r}-{i}", "items": [{"sku": "tea", "quantity": 1}]}
                answer = await http.post(f"{base}/v1/reservations", json=body, headers={"X-Request-ID": rid})
                assert answer.status_code == 201, answer.text
                assert answer.headers["x-request-id"] == rid

            await asyncio.gather(*(buy(i) for i in range(20)))
            sent += 20
            await asyncio.sleep(0.2)  # the access log lines reach the file
            if len({pid for rid, pid in answered_by(log).items() if rid.startswith("buy-")}) == 2:
                break
        buyers = {pid for rid, pid in answered_by(log).items() if rid.startswith("buy-")}
        assert len(buyers) == 2, f"one process answered all {sent} reservations: {buyers}"

        # then every scrape, whichever process answers it, counts every reservation
        scraped_by: set[int] = set()
        for i in range(40):
            page = await http.get(f"{base}/metrics", headers={"X-Request-ID": f"scrape-{i}"})
            assert page.status_code == 200
            assert reservations_total(page.text) == {"reserved": sent}, (i, reservations_total(page.text))
            await asyncio.sleep(0.05)
            scraped_by = {pid for rid, pid in answered_by(log).items() if rid.startswith("scrape-")}
            if len(scraped_by) == 2 and i >= 3:
                break
        assert scraped_by == buyers, f"the scrapes were all answered by {scraped_by}"


async def test_the_log_is_json_lines_and_a_request_s_lines_carry_its_id(served: tuple[str, Path]) -> None:
    base, log = served
    async with fresh_connections() as http:
        mine = await http.get(f"{base}/v1/skus/ghost", headers={"X-Request-ID": "trace-me-42"})
        bad = await http.get(f"{base}/healthz", headers={"X-Request-ID": "no spaces allowed"})
    assert mine.status_code == 404 and mine.headers["x-request-id"] == "trace-me-42"
    replaced = bad.headers["x-request-id"]
    assert replaced != "no spaces allowed" and len(replaced) == 24
    await asyncio.sleep(0.3)

    records = log_records(log)  # every line but serve's banner is one JSON object

    assert {"timestamp", "level", "logger", "pid", "message", "request_id"} <= set(records[-1])
    traced = [r for r in records if r["request_id"] == "trace-me-42"]
    assert [(r["logger"], r["level"]) for r in traced] == [("uvicorn.access", "INFO")], traced
    assert "GET /v1/skus/ghost" in traced[0]["message"] and "404" in traced[0]["message"]
    assert [r["message"].count("/healthz") for r in records if r["request_id"] == replaced] == [1]
    assert not [r for r in records if r["request_id"] == "no spaces allowed"]
    # start-up records belong to no request
    assert any(r["logger"] == "uvicorn.error" and r["request_id"] is None for r in records)
