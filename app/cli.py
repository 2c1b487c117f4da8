"""The `stockhold` command (typer): serve, migrate."""

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


if __name__ == "__main__":
    app()
