"""The `stockhold` command (typer): serve, migrate, worker."""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import ExitStack

import typer
import uvicorn

from app.config import get_settings
from app.store.embedded import EmbeddedPostgres, EmbeddedRedis

app = typer.Typer(help="stockhold: stock reservations that never oversell.", no_args_is_help=True)
log = logging.getLogger("stockhold")


def _start_embedded(stack: ExitStack) -> None:
    """Starts an embedded server for each of REDIS_URL / DATABASE_URL left unset, and points the
    variables at it so the API workers (separate processes) find them. Stopped when `stack` closes."""
    settings = get_settings()
    data = settings.data_dir.resolve()
    if not settings.redis_url:
        redis = EmbeddedRedis(data / "redis", persist=True)
        os.environ["REDIS_URL"] = redis.start()
        stack.callback(redis.stop)
        typer.echo(f"embedded Redis: {os.environ['REDIS_URL']} (data in {data / 'redis'})")
    if not settings.database_url:
        pg = EmbeddedPostgres(data / "postgres")
        os.environ["DATABASE_URL"] = pg.start()
        stack.callback(pg.stop)
        typer.echo(f"embedded PostgreSQL: {os.environ['DATABASE_URL']}")
    get_settings.cache_clear()


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address [STOCKHOLD_HOST, default 127.0.0.1]"),
    port: int = typer.Option(None, help="Port [STOCKHOLD_PORT, default 8000]"),
    workers: int = typer.Option(1, min=1, help="API worker processes"),
) -> None:
    """Serve the API (and its expiry sweeper). Starts embedded Redis / PostgreSQL when their URLs are unset."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with ExitStack() as stack:
        _start_embedded(stack)
        settings = get_settings()
        # Before the workers start, so a failing migration stops `serve` with one clear error; each
        # worker's lifespan applies them again, a no-op under the advisory lock.
        _migrate()
        typer.echo(f"stockhold on http://{host or settings.host}:{port or settings.port} (docs at /docs)")
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=host or settings.host,
            port=port or settings.port,
            workers=workers,
            log_level="info",
        )


def _migrate() -> list[str]:
    from app.store.postgres import apply_migrations, create_pool

    async def run() -> list[str]:
        url = get_settings().database_url
        assert url, "DATABASE_URL is not set"
        pool = await create_pool(url, max_size=1)
        try:
            return await apply_migrations(pool)
        finally:
            await pool.close()

    return asyncio.run(run())


@app.command()
def migrate() -> None:
    """Apply pending SQL migrations to DATABASE_URL (serialised with an advisory lock; re-running is a no-op)."""
    applied = _migrate()
    typer.echo(f"applied: {', '.join(applied)}" if applied else "schema up to date")


@app.command()
def worker(
    name: str = typer.Option(None, help="Consumer name in the group (default: host-pid); unique per process"),
) -> None:
    """Run a write-behind worker: shard event streams -> PostgreSQL ledger (stop with Ctrl-C)."""
    import signal
    import socket

    from app.stock.keys import KeySpace
    from app.store.postgres import apply_migrations, create_pool
    from app.store.redis import connect_redis
    from app.worker.consumer import WriteBehindWorker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if not settings.redis_url or not settings.database_url:
        raise typer.BadParameter("REDIS_URL and DATABASE_URL must be set for a separate worker")

    async def run() -> None:
        assert settings.redis_url and settings.database_url
        redis = connect_redis(settings.redis_url, pool_size=8)
        pg = await create_pool(settings.database_url, max_size=4)
        try:
            await apply_migrations(pg)
            consumer = name or f"worker-{socket.gethostname()}-{os.getpid()}"
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            typer.echo(f"write-behind worker {consumer} running")
            await WriteBehindWorker(redis, pg, KeySpace(settings.shard_count), consumer).run(stop)
        finally:
            await redis.aclose()
            await pg.close()

    asyncio.run(run())


if __name__ == "__main__":
    app()
