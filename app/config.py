"""The one Settings class: every knob stockhold reads from the environment.

Each timing default carries a comment on why it is what it is; the README's configuration table mirrors
this file (a test keeps them in step).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Unset -> `stockhold serve` starts an embedded Redis-compatible server under DATA_DIR.
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    # A Redis Cluster's nodes, host:port[,host:port...] (any few of them: the client learns the rest). The same
    # as REDIS_URL=redis+cluster://host:port,...; set one of the two.
    redis_cluster_nodes: str | None = Field(default=None, validation_alias="REDIS_CLUSTER_NODES")
    # On a cluster, a script's reply waits until this many replicas of its node have the change (WAIT), so a
    # failover that promotes one loses nothing stockhold acknowledged. Capped at the node's replica count; 0
    # answers as soon as the primary has it.
    redis_wait_replicas: int = Field(default=1, ge=0, le=5, validation_alias="STOCKHOLD_REDIS_WAIT_REPLICAS")
    # How long a reply waits for them. A replica on the same network acknowledges in well under a millisecond;
    # past 100 ms it is lagging or gone, and the write is answered anyway (logged, counted) rather than
    # turning a replica's trouble into an outage of sales.
    redis_wait_timeout_ms: int = Field(default=100, ge=1, le=10_000, validation_alias="STOCKHOLD_REDIS_WAIT_TIMEOUT_MS")
    # Unset -> `stockhold serve` starts an embedded PostgreSQL under DATA_DIR.
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    data_dir: Path = Field(default=Path(".data"), validation_alias="STOCKHOLD_DATA_DIR")

    host: str = Field(default="127.0.0.1", validation_alias="STOCKHOLD_HOST")
    port: int = Field(default=8000, validation_alias="STOCKHOLD_PORT")

    # Number of Redis hash-slot shards SKUs are spread over. A deployment constant: changing it moves
    # every SKU to another shard, so it needs a rebuild. 16 spreads a hot catalogue over a 3-primary cluster.
    shard_count: int = Field(default=16, ge=1, le=1024, validation_alias="STOCKHOLD_SHARDS")

    # Invariant 6 asks that an expired hold stops counting within 1 s with no client touching the SKU.
    # Sweeping every 200 ms leaves 800 ms for a slow tick (GC pause, busy Redis) inside that budget.
    sweep_interval_ms: int = Field(default=200, ge=10, le=250, validation_alias="STOCKHOLD_SWEEP_INTERVAL_MS")
    # Holds expired per script call: bounds how long one sweep call blocks Redis (~1 µs per line).
    sweep_batch: int = Field(default=200, ge=1, le=5000, validation_alias="STOCKHOLD_SWEEP_BATCH")

    # How long an Idempotency-Key's first answer is kept for replay. A day covers any sane client retry
    # policy (Stripe keeps 24 h as well) without keeping keys forever.
    idempotency_ttl_seconds: int = Field(
        default=86_400, ge=60, le=7 * 86_400, validation_alias="STOCKHOLD_IDEMPOTENCY_TTL_SECONDS"
    )
    # Request bodies above this are refused with 413 before parsing: the largest valid reservation
    # (50 items) is about 4 KiB, so 64 KiB leaves room and still stops memory abuse.
    max_body_bytes: int = Field(default=65_536, ge=1024, validation_alias="STOCKHOLD_MAX_BODY_BYTES")

    # Run the write-behind worker inside each API process (what `make run` wants); set false when
    # running `stockhold worker` processes separately.
    worker_in_process: bool = Field(default=True, validation_alias="STOCKHOLD_WORKER_IN_PROCESS")

    # Rebuild shards whose ready marker is gone (Redis lost its data) from PostgreSQL as soon as a process
    # notices (checked every 0.5 s), so an outage lasts seconds. False: stay not_ready until an operator
    # runs `stockhold rebuild`.
    auto_rebuild: bool = Field(default=True, validation_alias="STOCKHOLD_AUTO_REBUILD")

    # One log line per request costs a reservation about a tenth of its CPU at flash-sale rates (uvicorn's
    # access log, measured); /metrics counts requests instead. True for a trial that wants to see them.
    access_log: bool = Field(default=False, validation_alias="STOCKHOLD_ACCESS_LOG")

    # How `stockhold serve` and `stockhold worker` write their logs: one JSON object a line (what log
    # shippers parse without a grok pattern), each with the request id; `text` for a person at a terminal.
    log_format: Literal["json", "text"] = Field(default="json", validation_alias="STOCKHOLD_LOG_FORMAT")

    # How long an idle client connection stays open. It must outlast the idle timeout of whatever pools
    # connections in front of us (httpx and aiohttp keep 5 s, AWS ALB 60 s): when both sides give up at the
    # same moment, the client sends a request on a connection the server is closing and gets a reset
    # instead of an answer. uvicorn's own default is 5 s, exactly that race; 75 s is nginx's default.
    keep_alive_seconds: int = Field(default=75, ge=1, le=3600, validation_alias="STOCKHOLD_KEEP_ALIVE_SECONDS")

    # The sold-out fast path (app/stock/sold_out.py): the longest a process goes without re-reading the SKUs
    # it knows are sold out. It re-reads them as soon as an event lands on their shard's stream (a few ms);
    # this is the backstop, well inside the 100 ms the issue allows. 0 turns the fast path off.
    sold_out_refresh_ms: int = Field(default=50, ge=0, le=80, validation_alias="STOCKHOLD_SOLD_OUT_REFRESH_MS")

    # Rate limits (token buckets in Redis, shared by every process): requests per second and burst size,
    # per user (POST /v1/reservations, by user_id) and per client IP (every /v1 call). Off (0) by default:
    # the right figures depend on who calls stockhold. A shopper needs a few reservations a minute, so a
    # per-user 2/s with bursts of 5 never touches one, and stops a script firing hundreds a second.
    user_rate_per_second: float = Field(default=0, ge=0, le=1_000_000, validation_alias="STOCKHOLD_USER_RATE")
    user_burst: int = Field(default=5, ge=1, le=1_000_000, validation_alias="STOCKHOLD_USER_BURST")
    # Per IP only makes sense where the address is the shopper's: stockhold is usually called by a few
    # checkout servers, whose addresses carry everyone's traffic.
    ip_rate_per_second: float = Field(default=0, ge=0, le=1_000_000, validation_alias="STOCKHOLD_IP_RATE")
    ip_burst: int = Field(default=20, ge=1, le=1_000_000, validation_alias="STOCKHOLD_IP_BURST")
    # Behind a proxy: the header it puts the client's address in (X-Forwarded-For, X-Real-IP...). Only this
    # header is believed, and only its last address, the one the proxy itself appended; anything earlier
    # in it came from the client and may be forged. Unset: the TCP peer's address.
    client_ip_header: str | None = Field(default=None, validation_alias="STOCKHOLD_CLIENT_IP_HEADER")

    # The tenant an unauthenticated request acts for when the service runs open (see require_auth). Every
    # Redis key, event and reservation carries a tenant; with keys required, the key names it.
    default_tenant: str = Field(default="default", validation_alias="STOCKHOLD_TENANT")

    # Whether every /v1 call must present an API key. Unset: required, unless `stockhold serve` started
    # its own embedded servers (a local trial, `make run`), which runs open so the README's curl lines work
    # with no key, and says so loudly. Pointing at real servers therefore means keys are required unless
    # someone writes `false` on purpose: a deployment is never open by accident.
    require_auth: bool | None = Field(default=None, validation_alias="STOCKHOLD_REQUIRE_AUTH")
    # Set by `stockhold serve` for its API processes when it started an embedded Redis and PostgreSQL; only
    # read to resolve require_auth. Not meant to be set by hand.
    embedded: bool = Field(default=False, validation_alias="STOCKHOLD_EMBEDDED")
    # How often each API process reads the API key epoch (app/auth/epoch.py), i.e. how soon a revocation
    # binds it; `keys revoke` waits for every process to catch up. 50 ms costs two tiny Redis commands
    # per process 20 times a second. At most 500 ms: a process stops trusting its key cache when the epoch
    # has not been read for 1 s, so the period must leave room for a slow reply or two.
    auth_refresh_ms: int = Field(default=50, ge=5, le=500, validation_alias="STOCKHOLD_AUTH_REFRESH_MS")

    # Stock events as signed webhooks (app/webhooks/): each API process runs a dispatcher (shard streams ->
    # PostgreSQL outbox, its own consumer group) and a sender. False: neither runs here (see the README on
    # the consumer group left behind).
    webhooks: bool = Field(default=True, validation_alias="STOCKHOLD_WEBHOOKS")
    # One attempt's timeout: a receiver should answer 2xx at once and do its work after; 5 s is generous
    # for that and bounds what a hung receiver costs.
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=60, validation_alias="STOCKHOLD_WEBHOOK_TIMEOUT_S")
    # Attempts before a delivery is `failed`. With the backoff below, 8 attempts span about an hour
    # (30 s, 1, 2, 4, 8, 16, 32 min, each halved at random by the jitter): a receiver's deploy or a
    # short outage is ridden out; a day-long one is not, its deliveries stay in the log as failed.
    webhook_max_attempts: int = Field(default=8, ge=1, le=50, validation_alias="STOCKHOLD_WEBHOOK_MAX_ATTEMPTS")
    webhook_retry_base_s: float = Field(default=30.0, gt=0, le=3600, validation_alias="STOCKHOLD_WEBHOOK_RETRY_BASE_S")
    webhook_retry_cap_s: float = Field(
        default=3600.0, gt=0, le=86_400, validation_alias="STOCKHOLD_WEBHOOK_RETRY_CAP_S"
    )
    # Deliveries one process has in flight at once (and claims per step).
    webhook_concurrency: int = Field(default=16, ge=1, le=256, validation_alias="STOCKHOLD_WEBHOOK_CONCURRENCY")
    # How often a sender looks for due deliveries besides being woken by its own dispatcher: bounds the
    # delay of retries and of deliveries another process recorded. 500 ms is one indexed query per tick.
    webhook_poll_ms: int = Field(default=500, ge=10, le=60_000, validation_alias="STOCKHOLD_WEBHOOK_POLL_MS")
    # A dead dispatcher's unacknowledged entries are taken over after this long (the worker's 30 s too).
    webhook_claim_idle_ms: int = Field(
        default=30_000, ge=100, le=3_600_000, validation_alias="STOCKHOLD_WEBHOOK_CLAIM_IDLE_MS"
    )

    @model_validator(mode="after")
    def _cluster_url(self) -> Settings:
        if self.redis_cluster_nodes:
            url = "redis+cluster://" + ",".join(n.strip() for n in self.redis_cluster_nodes.split(",") if n.strip())
            if self.redis_url and self.redis_url != url:
                raise ValueError("set REDIS_URL or REDIS_CLUSTER_NODES, not both")
            self.redis_url = url
        return self

    @property
    def auth_required(self) -> bool:
        return self.require_auth if self.require_auth is not None else not self.embedded


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
