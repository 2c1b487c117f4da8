"""Webhook outbox -> HTTP POSTs: signed, retried with exponential backoff and jitter, every attempt logged.

Several processes send from the same outbox without coordination beyond PostgreSQL: a sender claims due
deliveries with ``FOR UPDATE SKIP LOCKED`` in a short transaction that counts the attempt and pushes the
row's ``next_attempt_at`` a lease ahead (the request timeout and a margin), sends with no transaction
open, then records the outcome: ``delivered`` on a 2xx, otherwise the next try after the backoff, or
``failed`` once ``max_attempts`` were made. A sender that dies mid-request leaves the row pending; when
the lease has passed, any sender takes it again. So delivery is at least once: a receiver can see a
delivery twice (after such a crash, or when its 2xx was lost) and dedupes on ``Webhook-Id``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import httpx
from prometheus_client import CollectorRegistry, Counter

from app.webhooks.signing import signature

log = logging.getLogger(__name__)

USER_AGENT = "stockhold-webhooks/0.1"
# Added to the request timeout to make the claim's lease: long enough that a live sender always records
# its outcome before anyone else may take the row, short enough that a dead sender's rows come back soon.
LEASE_MARGIN_S = 5.0
MAX_ERROR_LENGTH = 500

CLAIM = """
UPDATE webhook_delivery d
SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
FROM (SELECT d2.id FROM webhook_delivery d2
      JOIN webhook_endpoint e2 ON e2.id = d2.endpoint_id AND e2.active
      WHERE d2.status = 'pending' AND d2.next_attempt_at <= now()
      ORDER BY d2.next_attempt_at
      LIMIT $1
      FOR UPDATE OF d2 SKIP LOCKED) due, webhook_endpoint e, webhook_event ev
WHERE d.id = due.id AND e.id = d.endpoint_id AND ev.id = d.event_id
RETURNING d.id, d.attempts, d.event_id, e.id AS endpoint_id, e.url, e.secret, ev.payload::text AS body
"""

LOG_ATTEMPT = """
INSERT INTO webhook_attempt (delivery_id, attempt, started_at, duration_ms, status_code, error)
SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM webhook_delivery WHERE id = $1)
ON CONFLICT DO NOTHING
"""

# Only the attempt that still owns the row records its outcome: a sender that overran its lease (and
# whose row another sender took since) logs its attempt but leaves the status to the newer one.
RECORD_OUTCOME = """
UPDATE webhook_delivery
SET status = $3,
    delivered_at = CASE WHEN $3 = 'delivered' THEN now() END,
    next_attempt_at = CASE WHEN $3 = 'pending' THEN now() + make_interval(secs => $4) ELSE next_attempt_at END
WHERE id = $1 AND attempts = $2 AND status = 'pending'
"""


def retry_delay(attempt: int, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the try after failed attempt number `attempt` (1-based): ``base * 2^(attempt-1)``
    capped at `cap`, of which a random half ("equal jitter"), so receivers coming back from an outage are
    not hit by every sender's retries in the same second, and no retry comes sooner than half the step."""
    step = min(cap_s, base_s * 2.0 ** (attempt - 1))
    return step / 2 + rand() * step / 2


@dataclass(frozen=True, slots=True)
class DueDelivery:
    id: int
    attempt: int
    event_id: str
    endpoint_id: str
    url: str
    secret: str
    body: bytes


@dataclass(frozen=True, slots=True)
class AttemptResult:
    started_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


class DeliveryCounters:
    """Prometheus counters of this process's sender (under `serve`, a scrape sums every process's)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.attempts = Counter(
            "stockhold_webhook_attempts",
            "Webhook delivery attempts made by this process, by result (ok: a 2xx answer)",
            ["result"],
            registry=registry,
        )
        self.deliveries = Counter(
            "stockhold_webhook_deliveries",
            "Webhook deliveries finished by this process: sent (a 2xx) or failed (attempts exhausted)",
            ["outcome"],
            registry=registry,
        )


class WebhookSender:
    def __init__(
        self,
        pg: asyncpg.Pool,
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 8,
        retry_base_s: float = 30.0,
        retry_cap_s: float = 3600.0,
        concurrency: int = 16,
        poll_ms: int = 500,
        counters: DeliveryCounters | None = None,
    ) -> None:
        self.pg = pg
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.concurrency = concurrency
        self.poll_ms = poll_ms
        self.counters = counters or DeliveryCounters(CollectorRegistry())
        self.wake = asyncio.Event()  # set by this process's dispatcher when it recorded deliveries

    def notify(self) -> None:
        self.wake.set()

    async def claim(self, most: int) -> list[DueDelivery]:
        """Up to `most` due deliveries, each leased to this sender and its attempt counted (one statement)."""
        rows = await self.pg.fetch(CLAIM, most, self.timeout_s + LEASE_MARGIN_S)
        return [
            DueDelivery(
                r["id"], r["attempts"], r["event_id"], r["endpoint_id"], r["url"], r["secret"], r["body"].encode()
            )
            for r in rows
        ]

    async def _deliver_logged(self, http: httpx.AsyncClient, d: DueDelivery) -> None:
        try:
            await self._deliver(http, d)
        except Exception:  # PostgreSQL away: the row comes back when its lease ends
            log.exception("recording webhook %s attempt %d failed", d.event_id, d.attempt)

    async def _deliver(self, http: httpx.AsyncClient, d: DueDelivery) -> None:
        if d.attempt > self.max_attempts:  # claimed over and over by senders that died mid-request
            result = AttemptResult(datetime.now(UTC), 0.0, None, "not sent: every attempt was used up")
        else:
            result = await self.post(http, d)
        if result.ok:
            outcome, delay = "delivered", 0.0
        elif d.attempt >= self.max_attempts:
            outcome, delay = "failed", 0.0
        else:
            outcome, delay = "pending", retry_delay(d.attempt, self.retry_base_s, self.retry_cap_s)
        then = "gave up" if outcome == "failed" else f"next in {delay:.1f} s"
        log.info(
            "webhook %s attempt %d/%d to %s (%s): %s in %.1f ms%s",
            d.event_id,
            d.attempt,
            self.max_attempts,
            d.url,
            d.endpoint_id,
            result.status_code if result.status_code is not None else "no answer",
            result.duration_ms,
            "" if result.ok else f", {result.error}; {then}",
        )
        async with self.pg.acquire() as conn, conn.transaction():
            await conn.execute(
                LOG_ATTEMPT, d.id, d.attempt, result.started_at, result.duration_ms, result.status_code, result.error
            )
            await conn.execute(RECORD_OUTCOME, d.id, d.attempt, outcome, delay)
        self.counters.attempts.labels("ok" if result.ok else "error").inc()
        if outcome == "delivered":
            self.counters.deliveries.labels("sent").inc()
        elif outcome == "failed":
            self.counters.deliveries.labels("failed").inc()

    async def post(self, http: httpx.AsyncClient, d: DueDelivery) -> AttemptResult:
        """One signed POST; the answer's body is not read (a receiver owes us only its status)."""
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": d.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(d.secret, timestamp, d.body),
        }
        started_at, t0 = datetime.now(UTC), time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            async with http.stream("POST", d.url, content=d.body, headers=headers) as response:
                status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except httpx.TimeoutException as exc:
            error = f"timeout after {self.timeout_s:g} s ({type(exc).__name__})"
        except (httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]
        return AttemptResult(started_at, (time.perf_counter() - t0) * 1000, status, error)

    async def run(self, stop: asyncio.Event) -> None:
        """Sends until `stop` is set, up to `concurrency` deliveries in flight: it claims more as soon as
        one finishes, when this process's dispatcher recorded some, and every `poll_ms` (deliveries
        another process recorded, retries falling due). A delivery never waits for others to finish.
        Failing claims (PostgreSQL away) are retried at the next tick. At stop, deliveries in flight get
        the timeout to finish; any left are cancelled and come back when their lease ends."""
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        in_flight: set[asyncio.Task[None]] = set()
        stopping = asyncio.ensure_future(stop.wait())
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits, follow_redirects=False) as http:
            try:
                while not stop.is_set():
                    free = self.concurrency - len(in_flight)
                    if free > 0:
                        self.wake.clear()
                        try:
                            due = await self.claim(free)
                        except Exception:
                            log.exception("claiming webhook deliveries failed; retrying")
                            due = []
                        in_flight.update(asyncio.create_task(self._deliver_logged(http, d)) for d in due)
                        if due and len(due) == free:
                            continue  # more may be due: claim again once a slot frees
                    woken = asyncio.ensure_future(self.wake.wait())
                    try:
                        await asyncio.wait(
                            {stopping, woken, *in_flight},
                            timeout=self.poll_ms / 1000,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        woken.cancel()
                    in_flight = {t for t in in_flight if not t.done()}
            finally:
                stopping.cancel()
                if in_flight:
                    _, late = await asyncio.wait(in_flight, timeout=self.timeout_s + 1)
                    for task in late:
                        task.cancel()
