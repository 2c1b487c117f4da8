"""`stockhold serve` with no REDIS_URL / DATABASE_URL starts embedded servers under its data directory,
serves, and stops them cleanly on Ctrl-C (SIGINT) — the `make run` experience — and on SIGTERM (what a
container runtime or a service manager sends)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import embedded_data_dir
from tests.processes import free_port


def _server_processes_under(data: Path) -> list[psutil.Process]:
    """valkey-server and postgres processes whose command line names `data` (ours, not the machine's)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        name, cmd = proc.info["name"] or "", " ".join(proc.info["cmdline"] or [])
        if not name.startswith(("valkey-server", "postgres")):
            continue
        try:
            cwd = proc.cwd()  # valkey-server rewrites its title but runs in its data directory
        except psutil.Error:
            cwd = ""
        if str(data) in cmd or cwd.startswith(str(data)):
            found.append(proc)
    return found


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_starts_embedded_servers_and_stops_them_on_a_signal(tmp_path: Path, stop: signal.Signals) -> None:
    with ExitStack() as stack:
        _serve_and_interrupt(embedded_data_dir(stack) / "data", tmp_path, stop)


def _serve_and_interrupt(data: Path, tmp_path: Path, stop: signal.Signals) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["STOCKHOLD_DATA_DIR"] = str(data)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.25)
            else:
                raise AssertionError(f"not ready in 60 s:\n{log_path.read_text()}")
            put = httpx.put(f"http://127.0.0.1:{port}/v1/skus/tea", json={"on_hand": 2})
            assert put.status_code == 201
            # the servers' files are under the data directory
            assert (data / "redis").is_dir()
            assert (data / "postgres" / "PG_VERSION").is_file()
            ours = _server_processes_under(data)
            assert {p.info["name"].split()[0] for p in ours} >= {"valkey-server", "postgres"}, ours
        finally:
            proc.send_signal(stop)
            code = proc.wait(timeout=30)
    assert code == 0, log_path.read_text()
    gone = psutil.wait_procs(ours, timeout=10)[1]
    assert gone == [], f"left running: {[p.pid for p in gone]}"
