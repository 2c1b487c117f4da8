"""Real `stockhold serve` processes for tests: started on a free port, awaited until /readyz answers 200,
stopped with Ctrl-C (SIGINT) and, should that hang, killed — by their own PID only."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from loadtests.processes import free_port, stop_process

__all__ = ["REPO", "free_port", "stockhold_serve", "stop_process"]

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def stockhold_serve(env: dict[str, str], log_path: Path, workers: int = 2, ready_s: float = 30) -> Iterator[str]:
    """`stockhold serve --workers N` on a free port; yields its base URL once /readyz answers 200."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", str(workers)]
    with log_path.open("wb") as log:  # a file, not a pipe: an unread pipe fills up and blocks the server
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + ready_s
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, f"stockhold serve exited:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, f"not ready in {ready_s:g} s:\n{log_path.read_text()}"
                time.sleep(0.2)
            yield base
        finally:
            stop_process(proc, timeout_s=15)
