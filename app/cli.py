"""The `stockhold` command (typer): serve, migrate, worker, rebuild, reconcile, status, keys, webhooks-detach."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

import typer
import uvicorn

if TYPE_CHECKING:
    import asyncpg
    from redis.asyncio import Redis

    from app.stock.keys import KeySpace

from app.auth.scopes import Scope
from app.config import Settings, get_settings
from app.store.embedded import start_missing

app = typer.Typer(help="stockhold: stock reservations that never oversell.", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys: create (the key is shown once), list, revoke (binds every API process before it returns).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
log = logging.getLogger("stockhold")


def _start_embedded(stack: ExitStack) -> None:
    """Starts an embedded server for each of REDIS_URL / DATABASE_URL left unset, and points the
    variables at it so the API workers (separate processes) find them. Stopped when `stack` closes.
    Sets STOCKHOLD_EMBEDDED when it started both: a local trial, where API keys are not required unless
    STOCKHOLD_REQUIRE_AUTH says so. One real server with one embedded is not a trial: a forgotten
    REDIS_URL beside a production DATABASE_URL must not open the service."""
    settings = get_settings()
    data = settings.data_dir.resolve()
    redis_url, database_url = start_missing(stack, data, settings.redis_url, settings.database_url, persist_redis=True)
    if not settings.redis_url:
        os.environ["REDIS_URL"] = redis_url
        typer.echo(f"embedded Redis: {redis_url} (data in {data / 'redis'})")
    if not settings.database_url:
        os.environ["DATABASE_URL"] = database_url
        typer.echo(f"embedded PostgreSQL: {database_url}")
    if not settings.redis_url and not settings.database_url:
        os.environ["STOCKHOLD_EMBEDDED"] = "true"
    get_settings.cache_clear()


def _metrics_dir(stack: ExitStack) -> None:
    """Points PROMETHEUS_MULTIPROC_DIR at a fresh directory for this serve's API processes (removed when
    `stack` closes), so a scrape of any of them answers the deployment's totals (app/telemetry/metrics.py).
    One set by the operator (a volume shared with a sidecar, say) is used as it is, and kept."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    import shutil
    import tempfile

    # prometheus_client picks its storage when first imported, which happens after this returns: in the
    # worker processes uvicorn spawns (or, with one worker, when uvicorn imports the app here)
    path = tempfile.mkdtemp(prefix="stockhold-metrics-")
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address [STOCKHOLD_HOST, default 127.0.0.1]"),
    port: int = typer.Option(None, help="Port [STOCKHOLD_PORT, default 8000]"),
    workers: int = typer.Option(1, min=1, help="API worker processes"),
) -> None:
    """Serve the API (and its expiry sweeper). Starts embedded Redis / PostgreSQL when their URLs are unset."""
    from app.telemetry.logs import configure_logging

    log_config = configure_logging(get_settings().log_format)
    with ExitStack() as stack:
        _start_embedded(stack)
        _metrics_dir(stack)
        settings = get_settings()
        # Before the workers start, so a failing migration stops `serve` with one clear error; each
        # worker's lifespan applies them again, a no-op under the advisory lock.
        _migrate()
        typer.echo(f"stockhold on http://{host or settings.host}:{port or settings.port} (docs at /docs)")
        if settings.auth_required:
            typer.echo("API keys required (create one with `stockhold keys create`)")
        else:
            from app.api.auth import open_mode_notice

            if settings.log_format == "json":  # stderr then holds log records only, one JSON object a line
                log.warning("API keys NOT required: %s", open_mode_notice(settings))
            else:
                typer.secho(
                    f"WARNING: API keys NOT required: {open_mode_notice(settings)}", fg="red", bold=True, err=True
                )
        # uvicorn shuts down on SIGTERM, then sends the signal to itself again with the handler found before
        # it started: with the default one the process would die there, before this `with` stops the
        # embedded servers (left running, orphaned). This handler turns that second SIGTERM into a normal exit.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=host or settings.host,
            port=port or settings.port,
            workers=workers,
            log_level="info",
            log_config=log_config,  # each worker process applies it: the same JSON (or text) lines
            access_log=settings.access_log,
            timeout_keep_alive=settings.keep_alive_seconds,
        )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


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


T = TypeVar("T")


def _table(rows: Sequence[Sequence[str]], *, right: bool) -> str:
    """Rows of cells as aligned columns (the first row is the heading); `right` aligns numbers."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    pad = str.rjust if right else str.ljust
    return "\n".join("  ".join(pad(c, w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


@dataclass
class _Stores:
    settings: Settings
    redis: Redis
    pg: asyncpg.Pool
    keys: KeySpace


@asynccontextmanager
async def _stores(pool_size: int = 8) -> AsyncIterator[_Stores]:
    """Redis and PostgreSQL from REDIS_URL / DATABASE_URL (migrated), for the commands beside `serve`."""
    from app.stock.keys import KeySpace
    from app.store.postgres import apply_migrations, create_pool
    from app.store.redis import connect_redis

    settings = get_settings()
    if not settings.redis_url or not settings.database_url:
        raise typer.BadParameter("REDIS_URL and DATABASE_URL must be set (the servers `stockhold serve` uses)")
    redis = connect_redis(settings.redis_url, pool_size=pool_size)
    pg = await create_pool(settings.database_url, max_size=4)
    try:
        await apply_migrations(pg)
        yield _Stores(settings, redis, pg, KeySpace(settings.shard_count))
    finally:
        await redis.aclose()
        await pg.close()


def _run(body: Callable[[_Stores], Awaitable[T]]) -> T:
    async def main() -> T:
        async with _stores() as stores:
            return await body(stores)

    return asyncio.run(main())


@app.command()
def worker(
    name: str = typer.Option(None, help="Consumer name in the group (default: host-pid); unique per process"),
    batch: int = typer.Option(500, min=1, max=10_000, help="Most entries read per shard per step"),
    claim_idle_ms: int = typer.Option(
        30_000, min=100, help="Take over entries another worker left unacknowledged for this long"
    ),
) -> None:
    """Run a write-behind worker: shard event streams -> PostgreSQL (stop with Ctrl-C). Also rebuilds
    shards that lost their data when STOCKHOLD_AUTO_REBUILD is on."""
    import signal
    import socket

    from app.recovery.rebuild import Rebuilder
    from app.recovery.watch import ReadinessWatch
    from app.telemetry.logs import configure_logging
    from app.worker.consumer import WriteBehindWorker

    configure_logging(get_settings().log_format)

    async def body(s: _Stores) -> None:
        consumer = name or f"worker-{socket.gethostname()}-{os.getpid()}"
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        worker = WriteBehindWorker(
            s.redis,
            s.pg,
            s.keys,
            consumer,
            batch=batch,
            claim_idle_ms=claim_idle_ms,
            wait_replicas=s.settings.redis_wait_replicas,
        )
        watch = ReadinessWatch(Rebuilder(s.redis, s.pg, s.keys), auto_rebuild=s.settings.auto_rebuild)
        typer.echo(f"write-behind worker {consumer} running")
        await asyncio.gather(worker.run(stop), watch.run(stop))
        # What this consumer did, for whoever watches several workers share a group (loadtests/deployment.py):
        # every entry is delivered to one consumer of the group, so the workers' acknowledged entries add up
        # to the streams' entries unless one died and another took its pending entries over.
        typer.echo(
            f"write-behind worker {consumer} stopped: {worker.acknowledged_total} entries acknowledged,"
            f" {worker.persisted_total} new ledger rows"
        )

    _run(body)


@app.command()
def rebuild(
    shard: list[int] = typer.Option(None, help="Rebuild only this shard (repeatable); default: every shard"),
    only_missing: bool = typer.Option(
        False, "--only-missing", help="Only shards without their ready marker (what the automatic rebuild does)"
    ),
) -> None:
    """Reload Redis from PostgreSQL: counters, live holds with their deadlines, per-user counts.

    Each shard answers not_ready while it is rebuilt; events still in its stream are persisted first."""
    from app.recovery.rebuild import Rebuilder

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def body(s: _Stores) -> list[int]:
        rebuilder = Rebuilder(s.redis, s.pg, s.keys)
        if only_missing:
            return await rebuilder.rebuild()
        return await rebuilder.rebuild(shard or list(s.keys.all_shards()), force=True)

    done = _run(body)
    typer.echo(f"rebuilt shards: {', '.join(map(str, done))}" if done else "nothing to rebuild")


@app.command()
def reconcile(
    repair: bool = typer.Option(False, "--repair", help="Rebuild the shards that drift from PostgreSQL"),
) -> None:
    """Compare Redis with PostgreSQL per SKU; print any drift. Exit code 1 while drift remains."""
    from app.recovery.rebuild import Rebuilder
    from app.recovery.reconcile import Drift, compare

    def table(drift: list[Drift]) -> str:
        rows = [("shard", "tenant", "sku", "field", "redis", "postgresql")]
        rows += [(str(d.shard), d.tenant, d.sku, d.field, d.redis, d.postgres) for d in drift]
        return _table(rows, right=False)

    async def body(s: _Stores) -> list[Drift]:
        drift = await compare(s.redis, s.pg, s.keys)
        if not drift:
            typer.echo("no drift: Redis matches PostgreSQL for every SKU")
            return []
        typer.echo(f"drift on {len({(d.tenant, d.sku) for d in drift})} SKU(s):\n{table(drift)}")
        if not repair:
            return drift
        shards = sorted({d.shard for d in drift})
        await Rebuilder(s.redis, s.pg, s.keys).rebuild(shards, force=True)
        remaining = await compare(s.redis, s.pg, s.keys)
        typer.echo(f"repaired: rebuilt shards {shards} from PostgreSQL; drift left: {len(remaining)}")
        if remaining:
            typer.echo(table(remaining))
        return remaining

    if _run(body):
        raise typer.Exit(code=1)


@app.command()
def status() -> None:
    """The write-behind pipeline per shard: stream length, pending, undelivered, oldest unpersisted event."""
    from app.worker.status import ShardStatus, pipeline_status

    async def body(s: _Stores) -> list[ShardStatus]:
        return await pipeline_status(s.redis, s.pg, s.keys)

    rows = _run(body)
    head = (
        "shard",
        "ready",
        "stream",
        "pending",
        "undelivered",
        "oldest_unpersisted_s",
        "persisted",
        "last_persisted_id",
    )
    lines = [head] + [
        (
            str(r.shard),
            "yes" if r.ready else "NO",
            str(r.backlog.length),
            str(r.backlog.pending),
            str(r.backlog.undelivered),
            f"{r.oldest_unpersisted_age_s:.3f}",
            "?" if r.persisted_total is None else str(r.persisted_total),
            r.last_persisted_id or "-",
        )
        for r in rows
    ]
    typer.echo(_table(lines, right=True))
    waiting = sum(r.backlog.unpersisted for r in rows)
    oldest = max((r.oldest_unpersisted_age_s for r in rows), default=0.0)
    typer.echo(
        f"total: {waiting} events not yet in PostgreSQL, oldest {oldest:.3f}s; shards not ready: "
        f"{[r.shard for r in rows if not r.ready] or 'none'}"
    )


@app.command("webhooks-detach")
def webhooks_detach() -> None:
    """Destroy the webhook dispatcher's consumer group on every shard stream, after turning webhooks off
    everywhere (STOCKHOLD_WEBHOOKS=false): streams are trimmed only below what every group acknowledged,
    so a group nobody reads keeps every event. A process started with webhooks on creates it again."""
    from app.webhooks.dispatcher import drop_groups

    async def body(s: _Stores) -> int:
        return await drop_groups(s.redis, s.keys)

    typer.echo(f"webhook consumer group destroyed on {_run(body)} shard stream(s)")


# Exit code of `keys revoke` when the key is revoked in PostgreSQL but not every API process confirmed it
# (1 is an unknown id, 2 a usage error).
EXIT_NOT_CONFIRMED = 3


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., help="Tenant the key acts for (created if new): 1-64 of A-Z a-z 0-9 . _ -"),
    scope: Scope = typer.Option(..., help="admin: catalogue and stock; checkout: reservations; read: reading"),
    name: str = typer.Option(None, help="A note for `keys list`, e.g. who holds the key"),
) -> None:
    """Create an API key for a tenant, with one scope; the key is shown once.

    It is printed alone on stdout (KEY=$(stockhold keys create ...) works), the rest on stderr. Only its
    SHA-256 is kept, so it cannot be shown again."""
    from redis.exceptions import RedisError

    from app.auth.epoch import announce_change
    from app.auth.store import KeyRecord, KeyStore, validate_tenant
    from app.auth.tokens import ApiKey

    try:
        validate_tenant(tenant)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tenant") from exc

    async def body(s: _Stores) -> tuple[KeyRecord, ApiKey]:
        made = await KeyStore(s.pg).create(tenant, scope, name)
        try:
            # API processes cache unknown ids too: the bump makes them forget any they had for this one
            await announce_change(s.redis, s.keys)
        except RedisError as exc:
            typer.echo(f"note: could not bump the key epoch in Redis ({exc!r}); harmless for a new key", err=True)
        return made

    record, key = _run(body)
    typer.echo(key.token)
    typer.echo(
        f"created API key {record.id} for tenant {record.tenant!r}, scope {record.scope}"
        + (f", name {record.name!r}" if record.name else "")
        + ".\nStore it now: it is shown only this once (only its SHA-256 is kept). "
        + "Send it as `Authorization: Bearer <key>`.",
        err=True,
    )


@keys_app.command("list")
def keys_list(
    tenant: str = typer.Option(None, help="Only this tenant's keys"),
    all_: bool = typer.Option(False, "--all", help="Include revoked keys"),
) -> None:
    """List API keys: id, tenant, scope, name, when created and revoked. Never a secret (none is kept)."""
    from app.auth.store import KeyRecord, KeyStore

    async def body(s: _Stores) -> list[KeyRecord]:
        return await KeyStore(s.pg).list_keys(tenant, include_revoked=all_)

    records = _run(body)
    if not records:
        whose = f" for tenant {tenant!r}" if tenant else ""
        typer.echo(f"no API keys{whose}" + ("" if all_ else " (live ones; --all shows revoked ones too)"))
        return

    def when(at: datetime | None) -> str:
        return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if at else "-"

    rows = [("id", "tenant", "scope", "name", "created", "revoked")]
    rows += [(r.id, r.tenant, r.scope.value, r.name or "-", when(r.created_at), when(r.revoked_at)) for r in records]
    typer.echo(_table(rows, right=False))


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., metavar="ID", help="The key's id, as `keys list` shows it"),
    timeout: float = typer.Option(5.0, min=0.1, help="Seconds to wait for every API process to confirm"),
) -> None:
    """Revoke an API key; once this returns, no API process accepts it.

    Idempotent. After the change is in PostgreSQL it waits until every running API process has dropped
    the key from its cache. Exit 1: no such key; 3: revoked, but not every process confirmed within the
    timeout (they are named)."""
    from redis.exceptions import RedisError

    from app.auth.epoch import TRUST_MS, BarrierResult, announce_change, await_acknowledgements
    from app.auth.errors import UnknownKey
    from app.auth.store import KeyRecord, KeyStore

    async def body(s: _Stores) -> tuple[KeyRecord, BarrierResult | RedisError]:
        record = await KeyStore(s.pg).revoke(key_id)
        try:
            announced = await announce_change(s.redis, s.keys)
            return record, await await_acknowledgements(s.redis, s.keys, announced.epoch, timeout)
        except RedisError as exc:
            return record, exc

    try:
        record, barrier = _run(body)
    except UnknownKey as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(f"revoked API key {record.id} (tenant {record.tenant!r}, scope {record.scope}) in PostgreSQL")
    if isinstance(barrier, RedisError):
        typer.secho(
            f"WARNING: Redis did not answer ({barrier!r}): API processes that can read Redis may accept the key "
            f"from their caches until the key epoch moves; those that cannot stop trusting their caches within "
            f"{TRUST_MS} ms. Run `stockhold keys revoke {record.id}` again once Redis answers.",
            fg="red",
            err=True,
        )
        raise typer.Exit(code=EXIT_NOT_CONFIRMED)
    typer.echo(
        f"every API process refuses it: {len(barrier.acknowledged)} acknowledged in {barrier.elapsed_s * 1000:.0f} ms"
        if barrier.complete
        else f"{len(barrier.acknowledged)} API process(es) acknowledged in {barrier.elapsed_s * 1000:.0f} ms"
    )
    if barrier.silent:
        typer.echo(
            f"{len(barrier.silent)} process(es) silent for over {TRUST_MS} ms (stopped, or cut off from Redis: "
            f"not trusting their caches): {_names(barrier.silent)}"
        )
    if not barrier.complete:
        typer.secho(
            f"WARNING: not confirmed within {timeout:g} s by {_names(barrier.laggards)}: they may still accept "
            "the key (a process reading Redis should confirm within 50 ms; is it an older release?)",
            fg="red",
            err=True,
        )
        raise typer.Exit(code=EXIT_NOT_CONFIRMED)


def _names(processes: list[str], most: int = 5) -> str:
    return ", ".join(processes[:most]) + (f" and {len(processes) - most} more" if len(processes) > most else "")


if __name__ == "__main__":
    app()
