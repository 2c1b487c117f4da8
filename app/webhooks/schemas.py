"""Request and response bodies of the webhook and alert endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, model_validator

from app.webhooks.rules import WebhookEventType

MAX_URL_LENGTH = 2048


def _check_url(url: str) -> str:
    """http or https, with a host, no whitespace or control characters: what an HTTP client can POST to."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("the URL must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("the URL's scheme must be http or https")
    if not parts.hostname:
        raise ValueError("the URL must name a host")
    if port == 0:
        raise ValueError("the URL's port must be 1..65535")
    return url


WebhookUrl = Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH), AfterValidator(_check_url)]
# a JSON string becomes the enum (strict mode would want the enum itself)
EventName = Annotated[WebhookEventType, Strict(False)]
Events = Annotated[list[EventName], Field(min_length=1, max_length=len(WebhookEventType))]
Description = Annotated[str, Field(max_length=500)]


def _distinct(events: list[WebhookEventType] | None) -> None:
    if events is not None and len(set(events)) != len(events):
        raise ValueError("events: each event type at most once")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class WebhookCreate(_Body):
    """POST /v1/webhooks."""

    url: WebhookUrl
    events: Events
    description: Description | None = None

    @model_validator(mode="after")
    def _events_once(self) -> WebhookCreate:
        _distinct(self.events)
        return self


class WebhookUpdate(_Body):
    """PATCH /v1/webhooks/{id}: the fields given change, the others stay."""

    url: WebhookUrl | None = None
    events: Events | None = None
    description: Description | None = None
    active: bool | None = None

    @model_validator(mode="after")
    def _something(self) -> WebhookUpdate:
        if not self.model_fields_set:
            raise ValueError("give at least one of url, events, description, active")
        for name in ("url", "events", "active"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} may not be null")
        _distinct(self.events)
        return self


class WebhookState(BaseModel):
    id: str
    url: str
    events: list[WebhookEventType]
    description: str | None
    active: bool
    created_at: datetime
    updated_at: datetime


class WebhookCreated(WebhookState):
    secret: str = Field(description="The signing secret: shown in this answer only")


class WebhookList(BaseModel):
    webhooks: list[WebhookState]


class AlertSettings(_Body):
    """PUT /v1/skus/{sku}/alerts: null turns the low-stock alert off."""

    low_stock_threshold: int | None = Field(ge=1, le=1_000_000_000)


class AlertState(BaseModel):
    sku: str
    low_stock_threshold: int | None


class DeliveryAttempt(BaseModel):
    attempt: int
    started_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None


class Delivery(BaseModel):
    id: int
    event_id: str
    event_type: WebhookEventType
    status: str  # pending, delivered or failed
    attempts: int
    next_attempt_at: datetime | None  # null once delivered or failed
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any]
    attempt_log: list[DeliveryAttempt]


class DeliveryList(BaseModel):
    deliveries: list[Delivery]
