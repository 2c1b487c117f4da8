"""Catalogue routes: create/update a SKU, adjust its stock, book receipts and set its sales channels (admin
scope), read its state (any scope)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from app.api.deps import CatalogueTenant, IdempotencyKeyHeader, ReaderTenant, ServiceDep
from app.api.responses import AUTH_RESPONSES, json_response, problem_schema
from app.stock.channels import CHANNEL_PATTERN, ChannelSettings
from app.stock.idempotency import IdempotencyRequest, fingerprint
from app.stock.schemas import SKU_PATTERN, Adjustment, Receipt, ReceiptState, SkuSettings, SkuState, SplitSettings

router = APIRouter(prefix="/v1/skus", tags=["catalogue"], responses=AUTH_RESPONSES)
SkuPath = Annotated[str, Path(pattern=SKU_PATTERN, description="SKU id: 1-64 of A-Z a-z 0-9 . _ -")]
ChannelPath = Annotated[str, Path(pattern=CHANNEL_PATTERN, description="channel id: 1-64 of A-Z a-z 0-9 . _ -")]
ChannelQuery = Annotated[
    str | None,
    Query(pattern=CHANNEL_PATTERN, description="answer `available` for a reservation naming this channel"),
]


def _idempotency(
    key: str | None, request: Request, body: SkuSettings | Adjustment | Receipt | ChannelSettings
) -> IdempotencyRequest | None:
    if key is None:
        return None
    scope = f"{request.method} {request.url.path}"
    return IdempotencyRequest(key=key, scope=scope, fingerprint=fingerprint(scope, body.model_dump(mode="json")))


@router.put(
    "/{sku}",
    response_model=SkuState,
    summary="Create or update a SKU",
    responses={
        201: {"model": SkuState, "description": "Created"},
        409: problem_schema(
            "stock_conflict: on_hand - safety_stock below held + sold - backordered, or presale.cap below backordered"
        ),
        422: problem_schema("validation_error / idempotency_conflict"),
    },
)
async def put_sku(
    sku: SkuPath,
    body: SkuSettings,
    request: Request,
    service: ServiceDep,
    tenant: CatalogueTenant,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    state, created = await service.put_sku(tenant, sku, body, _idempotency(idempotency_key, request, body))
    return json_response(state, 201 if created else 200)


@router.post(
    "/{sku}/adjustments",
    response_model=SkuState,
    summary="Restock or shrink on_hand by a delta",
    responses={
        404: problem_schema("sku_not_found"),
        409: problem_schema("stock_conflict: the shrink goes below held + sold - backordered"),
        422: problem_schema("validation_error / idempotency_conflict"),
    },
)
async def adjust_stock(
    sku: SkuPath,
    body: Adjustment,
    request: Request,
    service: ServiceDep,
    tenant: CatalogueTenant,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    state = await service.adjust(tenant, sku, body, _idempotency(idempotency_key, request, body))
    return json_response(state)


@router.post(
    "/{sku}/receipts",
    response_model=ReceiptState,
    summary="Book arrived goods into on_hand, filling backorders oldest first",
    responses={
        404: problem_schema("sku_not_found"),
        422: problem_schema("validation_error / idempotency_conflict"),
    },
)
async def receive_stock(
    sku: SkuPath,
    body: Receipt,
    request: Request,
    service: ServiceDep,
    tenant: CatalogueTenant,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    state = await service.receive(tenant, sku, body, _idempotency(idempotency_key, request, body))
    return json_response(state)


@router.put(
    "/{sku}/channels/{channel}",
    response_model=SkuState,
    summary="Create or update a sales channel of a SKU: ring-fenced quota, priority, borrowing",
    responses={
        201: {"model": SkuState, "description": "Created"},
        404: problem_schema("sku_not_found"),
        409: problem_schema("stock_conflict: quota below what the channel already took / too_many_channels"),
        422: problem_schema("validation_error / idempotency_conflict"),
    },
)
async def put_channel(
    sku: SkuPath,
    channel: ChannelPath,
    body: ChannelSettings,
    request: Request,
    service: ServiceDep,
    tenant: CatalogueTenant,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    idem = _idempotency(idempotency_key, request, body)
    state, created = await service.put_channel(tenant, sku, channel, body, idem)
    return json_response(state, 201 if created else 200)


@router.get(
    "/{sku}",
    response_model=SkuState,
    summary="Read a SKU's stock (for one channel with ?channel=)",
    responses={404: problem_schema("sku_not_found")},
)
async def get_sku(sku: SkuPath, service: ServiceDep, tenant: ReaderTenant, channel: ChannelQuery = None) -> Response:
    return json_response(await service.get_sku(tenant, sku, channel))


@router.put(
    "/{sku}/split",
    response_model=SkuState,
    summary="Split a hot SKU's stock over buckets on different shards (1: gather it back into one)",
    responses={
        404: problem_schema("sku_not_found"),
        409: problem_schema("split_conflict: a per-user limit, presale or channels; more buckets than shards"),
        422: problem_schema("validation_error"),
    },
)
async def put_split(sku: SkuPath, body: SplitSettings, service: ServiceDep, tenant: CatalogueTenant) -> Response:
    """Idempotent by nature: the same body twice leaves the same split (and evens the buckets out again)."""
    assert service.splitter is not None
    return json_response(await service.splitter.put_split(tenant, sku, body.buckets))


@router.post(
    "/{sku}/rebalance",
    response_model=SkuState,
    summary="Even out a split SKU's free units over its buckets",
    responses={
        404: problem_schema("sku_not_found"),
        409: problem_schema("split_conflict: the SKU is not split"),
    },
)
async def rebalance(sku: SkuPath, service: ServiceDep, tenant: CatalogueTenant) -> Response:
    assert service.splitter is not None
    return json_response(await service.splitter.rebalance(tenant, sku))
