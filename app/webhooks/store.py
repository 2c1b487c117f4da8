"""PostgreSQL repository of webhook endpoints, low-stock thresholds and the delivery log.

Every query names the tenant: another tenant's endpoint is not found, exactly like a missing one.
"""

from __future__ import annotations

import os
from typing import Any

import asyncpg
import orjson

from app.webhooks.errors import WebhookNotFound
from app.webhooks.schemas import (
    AlertState,
    Delivery,
    WebhookCreate,
    WebhookCreated,
    WebhookState,
    WebhookUpdate,
)
from app.webhooks.signing import new_secret

_ALPHABET = b"abcdefghijklmnopqrstuvwxyz234567"
_TO_BASE32 = bytes(_ALPHABET[b % 32] for b in range(256))
_COLUMNS = "id, url, events, description, active, created_at, updated_at"


def new_webhook_id() -> str:
    """``wh_`` and 80 random bits as 16 lowercase base32 characters: ids say nothing of how many exist."""
    return "wh_" + os.urandom(16).translate(_TO_BASE32).decode()


def _state(row: asyncpg.Record) -> WebhookState:
    return WebhookState.model_validate(dict(row))


DELIVERIES = """
SELECT d.id, d.event_id, ev.type AS event_type, d.status, d.attempts,
       CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
       d.created_at, d.delivered_at, ev.payload,
       COALESCE((SELECT json_agg(json_build_object(
                    'attempt', a.attempt, 'started_at', a.started_at, 'duration_ms', a.duration_ms,
                    'status_code', a.status_code, 'error', a.error) ORDER BY a.attempt)
                 FROM webhook_attempt a WHERE a.delivery_id = d.id), '[]'::json) AS attempt_log
FROM webhook_delivery d JOIN webhook_event ev ON ev.id = d.event_id
WHERE d.endpoint_id = $1
ORDER BY d.id DESC
LIMIT $2
"""


class WebhookStore:
    def __init__(self, pg: asyncpg.Pool) -> None:
        self.pg = pg

    async def create(self, tenant: str, body: WebhookCreate) -> WebhookCreated:
        """One INSERT; the secret is generated here and answered only by this call."""
        secret = new_secret()
        row = await self.pg.fetchrow(
            f"INSERT INTO webhook_endpoint (id, tenant, url, events, description, secret) "
            f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}",
            new_webhook_id(),
            tenant,
            body.url,
            [e.value for e in body.events],
            body.description,
            secret,
        )
        assert row is not None
        return WebhookCreated.model_validate({**dict(row), "secret": secret})

    async def list_endpoints(self, tenant: str) -> list[WebhookState]:
        rows = await self.pg.fetch(
            f"SELECT {_COLUMNS} FROM webhook_endpoint WHERE tenant = $1 ORDER BY created_at, id", tenant
        )
        return [_state(r) for r in rows]

    async def get(self, tenant: str, webhook_id: str) -> WebhookState:
        row = await self.pg.fetchrow(
            f"SELECT {_COLUMNS} FROM webhook_endpoint WHERE tenant = $1 AND id = $2", tenant, webhook_id
        )
        if row is None:
            raise WebhookNotFound(f"webhook {webhook_id!r} does not exist", webhook_id=webhook_id)
        return _state(row)

    async def update(self, tenant: str, webhook_id: str, body: WebhookUpdate) -> WebhookState:
        """One UPDATE of the fields given (a field left out keeps its value)."""
        given = body.model_fields_set
        row = await self.pg.fetchrow(
            f"""UPDATE webhook_endpoint SET
                   url = CASE WHEN $3 THEN $4 ELSE url END,
                   events = CASE WHEN $5 THEN $6::text[] ELSE events END,
                   description = CASE WHEN $7 THEN $8 ELSE description END,
                   active = CASE WHEN $9 THEN $10 ELSE active END,
                   updated_at = now()
                WHERE tenant = $1 AND id = $2
                RETURNING {_COLUMNS}""",
            tenant,
            webhook_id,
            "url" in given,
            body.url,
            "events" in given,
            [e.value for e in body.events] if body.events is not None else None,
            "description" in given,
            body.description,
            "active" in given,
            body.active,
        )
        if row is None:
            raise WebhookNotFound(f"webhook {webhook_id!r} does not exist", webhook_id=webhook_id)
        return _state(row)

    async def delete(self, tenant: str, webhook_id: str) -> None:
        """Deletes the endpoint with its deliveries and their log (pending ones are never sent)."""
        deleted = await self.pg.fetchval(
            "DELETE FROM webhook_endpoint WHERE tenant = $1 AND id = $2 RETURNING id", tenant, webhook_id
        )
        if deleted is None:
            raise WebhookNotFound(f"webhook {webhook_id!r} does not exist", webhook_id=webhook_id)

    async def deliveries(self, tenant: str, webhook_id: str, limit: int) -> list[Delivery]:
        """The endpoint's deliveries, newest first, each with every attempt (oldest attempt first)."""
        await self.get(tenant, webhook_id)  # 404 for another tenant's endpoint
        rows = await self.pg.fetch(DELIVERIES, webhook_id, limit)
        return [_delivery(r) for r in rows]

    async def get_alert(self, tenant: str, sku: str) -> AlertState:
        threshold = await self.pg.fetchval(
            "SELECT low_stock_threshold FROM sku_alert WHERE tenant = $1 AND sku = $2", tenant, sku
        )
        return AlertState(sku=sku, low_stock_threshold=threshold)

    async def put_alert(self, tenant: str, sku: str, threshold: int | None) -> AlertState:
        """Sets (or, with None, removes) the SKU's low-stock threshold: one statement."""
        if threshold is None:
            await self.pg.execute("DELETE FROM sku_alert WHERE tenant = $1 AND sku = $2", tenant, sku)
        else:
            await self.pg.execute(
                """INSERT INTO sku_alert (tenant, sku, low_stock_threshold) VALUES ($1, $2, $3)
                   ON CONFLICT (tenant, sku) DO UPDATE
                   SET low_stock_threshold = EXCLUDED.low_stock_threshold, updated_at = now()""",
                tenant,
                sku,
                threshold,
            )
        return AlertState(sku=sku, low_stock_threshold=threshold)


def _delivery(row: asyncpg.Record) -> Delivery:
    data: dict[str, Any] = dict(row)
    data["payload"] = orjson.loads(data["payload"])
    data["attempt_log"] = orjson.loads(data["attempt_log"])
    return Delivery.model_validate(data)
