"""Webhook errors: domain errors (app/stock/errors.py's base), mapped to problem documents by the API."""

from __future__ import annotations

from app.stock.errors import StockError


class WebhookNotFound(StockError):
    """Another tenant's endpoint answers this too, exactly as one that does not exist."""

    code = "webhook_not_found"
    title = "Webhook not found"
