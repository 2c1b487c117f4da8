"""What both benchmarks need around them: a workspace with the servers (embedded unless REDIS_URL /
DATABASE_URL are set); free loopback ports and stopping what they started by its own PID come from
loadtests/processes.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from app.store.embedded import start_missing
from loadtests.processes import free_port, stop_process

__all__ = ["Workspace", "free_port", "stop_process", "workspace"]


@dataclass(frozen=True)
class Workspace:
    work: Path  # a temporary directory for logs and embedded data, removed at the end
    redis_url: str
    database_url: str
    embedded: bool  # neither server was given


def workspace(stack: ExitStack) -> Workspace:
    work = Path(tempfile.mkdtemp(prefix="stockhold-bench-"))
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    given_redis, given_database = os.environ.get("REDIS_URL"), os.environ.get("DATABASE_URL")
    redis_url, database_url = start_missing(stack, work, given_redis, given_database)
    return Workspace(work, redis_url, database_url, embedded=not given_redis and not given_database)
