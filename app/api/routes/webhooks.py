"""Webhook routes: endpoints that receive signed stock events, their delivery log, and per-SKU low-stock
thresholds. Changing them takes the admin scope; reading them any scope. Another tenant's endpoint is
404 webhook_not_found, like one that does not exist.

The writes take no Idempotency-Key: PATCH, PUT and DELETE are idempotent by themselves, and a POST retried
after a lost answer creates a second endpoint, whose secret only that answer shows (delete the spare).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from app.api.deps import CatalogueTenant, ReaderTenant
from app.api.responses import AUTH_RESPONSES, json_response, problem_schema
from app.stock.schemas import SKU_PATTERN
from app.webhooks.alerts import AlertBook
from app.webhooks.schemas import (
    AlertSettings,
    AlertState,
    DeliveryList,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookState,
    WebhookUpdate,
)
from app.webhooks.store import WebhookStore

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=AUTH_RESPONSES)
alerts_router = APIRouter(prefix="/v1/skus", tags=["webhooks"], responses=AUTH_RESPONSES)
WebhookPath = Annotated[str, Path(max_length=64, description="the webhook's id, wh_...")]
SkuPath = Annotated[str, Path(pattern=SKU_PATTERN, description="SKU id: 1-64 of A-Z a-z 0-9 . _ -")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: problem_schema("webhook_not_found")}


def _store(request: Request) -> WebhookStore:
    store: WebhookStore = request.app.state.webhooks
    return store


def _alerts(request: Request) -> AlertBook:
    book: AlertBook = request.app.state.alerts
    return book


@router.post(
    "",
    status_code=201,
    response_model=WebhookCreated,
    summary="Subscribe an endpoint to stock events; the answer shows its signing secret, once",
    responses={422: problem_schema("validation_error (url: http or https only; events: known types, once each)")},
)
async def create_webhook(body: WebhookCreate, request: Request, tenant: CatalogueTenant) -> Response:
    return json_response(await _store(request).create(tenant, body), 201)


@router.get("", response_model=WebhookList, summary="List the tenant's webhook endpoints (never their secrets)")
async def list_webhooks(request: Request, tenant: ReaderTenant) -> Response:
    return json_response(WebhookList(webhooks=await _store(request).list_endpoints(tenant)))


@router.get("/{webhook_id}", response_model=WebhookState, summary="Read a webhook endpoint", responses=NOT_FOUND)
async def get_webhook(webhook_id: WebhookPath, request: Request, tenant: ReaderTenant) -> Response:
    return json_response(await _store(request).get(tenant, webhook_id))


@router.patch(
    "/{webhook_id}",
    response_model=WebhookState,
    summary="Change an endpoint's url, events, description or active flag (fields left out stay)",
    responses={**NOT_FOUND, 422: problem_schema("validation_error")},
)
async def update_webhook(
    webhook_id: WebhookPath, body: WebhookUpdate, request: Request, tenant: CatalogueTenant
) -> Response:
    return json_response(await _store(request).update(tenant, webhook_id, body))


@router.delete(
    "/{webhook_id}",
    status_code=204,
    summary="Delete an endpoint with its delivery log (pending deliveries are not sent)",
    responses=NOT_FOUND,
)
async def delete_webhook(webhook_id: WebhookPath, request: Request, tenant: CatalogueTenant) -> Response:
    await _store(request).delete(tenant, webhook_id)
    return Response(status_code=204)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=DeliveryList,
    summary="The endpoint's deliveries, newest first, each with its attempts",
    responses={**NOT_FOUND, 422: problem_schema("validation_error")},
)
async def list_deliveries(
    webhook_id: WebhookPath,
    request: Request,
    tenant: ReaderTenant,
    limit: Annotated[int, Query(ge=1, le=500, description="most deliveries answered")] = 50,
) -> Response:
    return json_response(DeliveryList(deliveries=await _store(request).deliveries(tenant, webhook_id, limit)))


@alerts_router.put(
    "/{sku}/alerts",
    response_model=AlertState,
    summary="Set the SKU's low-stock threshold (null: no low_stock events)",
    responses={404: problem_schema("sku_not_found"), 422: problem_schema("validation_error")},
)
async def put_alerts(sku: SkuPath, body: AlertSettings, request: Request, tenant: CatalogueTenant) -> Response:
    return json_response(await _alerts(request).put(tenant, sku, body.low_stock_threshold))


@alerts_router.get(
    "/{sku}/alerts",
    response_model=AlertState,
    summary="Read the SKU's low-stock threshold",
    responses={404: problem_schema("sku_not_found")},
)
async def get_alerts(sku: SkuPath, request: Request, tenant: ReaderTenant) -> Response:
    return json_response(await _alerts(request).get(tenant, sku))
