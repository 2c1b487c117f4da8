"""Listing routes: map a storefront listing to the SKUs it is made of (admin scope), read it (any scope).

A PUT is idempotent by itself (the same body leaves the same listing), so it takes no Idempotency-Key.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from app.api.deps import CatalogueTenant, ReaderTenant
from app.api.responses import AUTH_RESPONSES, json_response, problem_schema
from app.stock.listings import ListingCatalogue
from app.stock.schemas import SKU_PATTERN, Listing, ListingState

router = APIRouter(prefix="/v1/listings", tags=["catalogue"], responses=AUTH_RESPONSES)
ListingPath = Annotated[str, Path(pattern=SKU_PATTERN, description="listing id: 1-64 of A-Z a-z 0-9 . _ -")]


def _catalogue(request: Request) -> ListingCatalogue:
    catalogue: ListingCatalogue = request.app.state.listings
    return catalogue


@router.put(
    "/{listing}",
    response_model=ListingState,
    summary="Create or replace a listing: the SKUs it is made of, each a number of times",
    responses={201: {"model": ListingState, "description": "Created"}, 422: problem_schema("validation_error")},
)
async def put_listing(listing: ListingPath, body: Listing, request: Request, tenant: CatalogueTenant) -> Response:
    state, created = await _catalogue(request).put(tenant, listing, body)
    return json_response(state, 201 if created else 200)


@router.get(
    "/{listing}",
    response_model=ListingState,
    summary="Read a listing",
    responses={404: problem_schema("listing_not_found")},
)
async def get_listing(listing: ListingPath, request: Request, tenant: ReaderTenant) -> Response:
    return json_response(await _catalogue(request).get(tenant, listing))
