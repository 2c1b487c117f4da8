"""Webhooks inside an API process: the stores the routes use and, unless STOCKHOLD_WEBHOOKS=false, the
dispatcher and sender as background tasks (app/main.py's lifespan calls this before serving)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from app.config import Settings
from app.webhooks.alerts import AlertBook
from app.webhooks.dispatcher import WebhookDispatcher
from app.webhooks.sender import DeliveryCounters, WebhookSender
from app.webhooks.store import WebhookStore


async def start_webhooks(state: Any, settings: Settings, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    """Puts the webhook store and alert book on `state`; with webhooks on, creates the consumer groups
    (before serving, so no event of this process's life is missed) and starts the two loops."""
    state.webhooks = WebhookStore(state.pg)
    state.alerts = AlertBook(state.redis, state.keys, state.webhooks)
    if not settings.webhooks:
        return []
    sender = WebhookSender(
        state.pg,
        timeout_s=settings.webhook_timeout_s,
        max_attempts=settings.webhook_max_attempts,
        retry_base_s=settings.webhook_retry_base_s,
        retry_cap_s=settings.webhook_retry_cap_s,
        concurrency=settings.webhook_concurrency,
        poll_ms=settings.webhook_poll_ms,
        counters=DeliveryCounters(state.metrics.registry),
    )
    dispatcher = WebhookDispatcher(
        state.redis,
        state.pg,
        state.keys,
        consumer=f"api-{socket.gethostname()}-{os.getpid()}",
        claim_idle_ms=settings.webhook_claim_idle_ms,
        on_recorded=sender.notify,
    )
    await dispatcher.ensure_groups()
    state.webhook_dispatcher, state.webhook_sender = dispatcher, sender
    return [
        asyncio.create_task(dispatcher.run(stop), name="webhook-dispatch"),
        asyncio.create_task(sender.run(stop), name="webhook-send"),
    ]
