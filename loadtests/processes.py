"""Local processes the load tests, the benchmarks and the test suite start: a free loopback port to run
them on, and stopping one by its own handle (Ctrl-C first, so `stockhold serve` stops its workers
cleanly; a kill should that hang). Never by name: other processes on the machine are not ours."""

from __future__ import annotations

import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
