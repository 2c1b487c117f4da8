"""What both benchmarks need around them: a workspace with the servers (embedded unless REDIS_URL /
DATABASE_URL are set), free loopback ports, and stopping what they started by its own PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from app.store.embedded import EmbeddedPostgres, EmbeddedRedis


@dataclass(frozen=True)
class Workspace:
    work: Path  # a temporary directory for logs and embedded data, removed at the end
    redis_url: str
    database_url: str
    embedded: bool  # neither server was given


def workspace(stack: ExitStack) -> Workspace:
    work = Path(tempfile.mkdtemp(prefix="stockhold-bench-"))
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    redis_url, database_url = os.environ.get("REDIS_URL"), os.environ.get("DATABASE_URL")
    embedded = not redis_url and not database_url
    if not redis_url:
        embedded_redis = EmbeddedRedis(work / "redis")
        redis_url = embedded_redis.start()
        stack.callback(embedded_redis.stop)
    if not database_url:
        embedded_pg = EmbeddedPostgres(work / "postgres")
        database_url = embedded_pg.start()
        stack.callback(embedded_pg.stop)
    return Workspace(work, redis_url, database_url, embedded)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    """Ctrl-C (SIGINT), and a kill should that hang."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
