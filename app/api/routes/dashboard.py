"""The live dashboard: GET /dashboard, one self-contained page (inline CSS, JS and an SVG chart, nothing
fetched from anywhere else), and GET /v1/dashboard, the tenant-scoped figures it polls every second
(app/stock/dashboard.py).

The page holds no data and needs no key to load; its JSON needs one, like any /v1 read (every scope may
read its own tenant's). The page is served with a Content-Security-Policy allowing exactly its own inline
script and style (by their SHA-256) and requests to this origin only, so nothing injected into it could run
or send anything elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app.api.deps import ReaderTenant
from app.api.responses import AUTH_RESPONSES, json_response, problem_schema
from app.stock.dashboard import (
    DEFAULT_HOLDS,
    DEFAULT_SKUS,
    DEFAULT_WITHIN_SECONDS,
    MAX_HOLDS,
    MAX_NAMED,
    MAX_SKUS,
    MAX_WITHIN_SECONDS,
    Dashboard,
    DashboardQuery,
    DashboardReader,
)
from app.stock.schemas import SkuId

PAGE = (Path(__file__).resolve().parents[1] / "dashboard.html").read_text(encoding="utf-8")


def _hashes(tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, flags=re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        f"script-src {_hashes('script')}",
        f"style-src {_hashes('style')}",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

page_router = APIRouter(tags=["dashboard"])
router = APIRouter(prefix="/v1/dashboard", tags=["dashboard"], responses=AUTH_RESPONSES)


@page_router.get(
    "/dashboard",
    summary="The live dashboard (HTML): polls /v1/dashboard every second; a key goes in the URL as #key=…",
    response_class=Response,
    responses={200: {"content": {"text/html": {}}, "description": "The page"}},
)
async def dashboard_page() -> Response:
    return Response(PAGE, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get(
    "",
    response_model=Dashboard,
    summary="The tenant's SKUs with live counters, its holds closest to their deadline, the write-behind lag",
    responses={
        404: problem_schema("sku_not_found: a SKU named in ?sku= does not exist"),
        422: problem_schema("validation_error"),
    },
)
async def read_dashboard(
    request: Request,
    tenant: ReaderTenant,
    sku: Annotated[
        list[SkuId],
        Query(max_length=MAX_NAMED, description="SKUs to show (repeat; at most 20); none: the most recently changed"),
    ] = [],  # noqa: B006 (FastAPI copies a default list per request)
    limit: Annotated[int, Query(ge=1, le=MAX_SKUS, description="SKUs shown when none is named")] = DEFAULT_SKUS,
    within_seconds: Annotated[
        int, Query(ge=1, le=MAX_WITHIN_SECONDS, description="holds with a deadline this close count as expiring")
    ] = DEFAULT_WITHIN_SECONDS,
    holds: Annotated[
        int, Query(ge=0, le=MAX_HOLDS, description="expiring holds listed, the soonest first")
    ] = DEFAULT_HOLDS,
) -> Response:
    reader: DashboardReader = request.app.state.dashboard
    query = DashboardQuery(skus=tuple(sku), limit=limit, within_seconds=within_seconds, holds=holds)
    return json_response(await reader.read(tenant, query))
