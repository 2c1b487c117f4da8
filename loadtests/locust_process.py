"""Locust as a bounded subprocess: one process (no --processes: the outcomes live in its memory), headless,
HTML report and CSV under the run's folder, killed by its PID should it outlive its time bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.scenarios import ENV_VAR, STATS_FILE, Run

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REPO = LOCUSTFILE.parents[1]
STOP_TIMEOUT_S = 10  # users still inside a request get this long to finish it when the time is up
# beyond run time and stop timeout: Locust's start, the report, the outcomes file
GRACE_S = 60


@dataclass(frozen=True)
class LocustRun:
    exit_code: int | None  # None: killed at its time bound
    seconds: float
    html: Path
    stats_csv: Path  # Locust's own, refreshed once a second: its last second may be missing
    log: Path

    @property
    def clean(self) -> bool:
        # --exit-code-on-error 0: failed requests are the audit's to judge; non-zero means Locust itself
        # (or a user's code) broke
        return self.exit_code == 0


def run_locust(run: Run, host: str, folder: Path) -> LocustRun:
    scenario = run.scenario
    html, csv_prefix, log_path = folder / "report.html", folder / "locust", folder / "locust.log"
    cmd = [
        *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host),
        *("--users", str(scenario.users), "--spawn-rate", f"{scenario.spawn_rate:g}"),
        *("--run-time", f"{scenario.run_time_s}s", "--stop-timeout", str(STOP_TIMEOUT_S)),
        *("--html", str(html), "--csv", str(csv_prefix), "--only-summary", "--exit-code-on-error", "0"),
        *scenario.user_classes(),
    ]
    # the locustfile imports loadtests.*: the repository must be on the path whatever the caller's cwd
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, ENV_VAR: run.to_json(), "PYTHONPATH": python_path}
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        code: int | None = None
        try:
            code = proc.wait(timeout=scenario.run_time_s + STOP_TIMEOUT_S + GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        finally:  # past its bound, or the runner interrupted: this PID only
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return LocustRun(code, time.monotonic() - started, html, Path(f"{csv_prefix}_stats.csv"), log_path)


def read_figures(folder: Path) -> list[dict[str, Any]]:
    """Per request name and the aggregate (last), as the locustfile wrote them when the test stopped."""
    path = folder / STATS_FILE
    return list(json.loads(path.read_text())) if path.exists() else []


def figures_table(figures: list[dict[str, Any]]) -> str:
    heads = ("request", "count", "failures", "req/s", "peak/s", "p50 ms", "p95 ms", "p99 ms", "max ms")
    keys = ("name", "requests", "failures", "rps", "peak_rps", "p50", "p95", "p99", "max")
    rows = [heads, *(tuple(str(f[k]) for k in keys) for f in figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )
