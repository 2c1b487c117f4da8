"""Listings and bundles: a storefront listing names the SKUs it is made of; a reservation may name
listings, whose components are reserved with its SKU lines, all-or-nothing.

A listing moves no stock, so it is not an event: PUT writes PostgreSQL's ``listing`` row first (the
system of record), then the listing's key in Redis on the shard of (tenant, listing), which reservations
read. A rebuild writes a shard's listings back from PostgreSQL; reconcile compares them.

Expansion merges: a SKU named by two listings of one reservation, or by a listing and a SKU line, becomes
one line with the quantities summed, so reserve.lua checks it against the stock once for the whole
reservation. (Checked line by line, each line would see stock the other line has already taken.)
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import orjson
from redis.asyncio import Redis

from app.stock.errors import ListingNotFound, NotReady, ReservationTooLarge
from app.stock.keys import KeySpace
from app.stock.schemas import Listing, ListingComponent, ListingState, ReservationItem, ReservationRequest

# The bounds a reservation's SKU lines keep once listings are expanded: the API's own for SKU lines
MAX_LINES = 50
MAX_QUANTITY = 1000

UPSERT = """
INSERT INTO listing (tenant, listing, components) VALUES ($1, $2, $3::jsonb)
ON CONFLICT (tenant, listing) DO UPDATE SET components = EXCLUDED.components, updated_at = now()
RETURNING (xmax = 0) AS created
"""


class ListingCatalogue:
    def __init__(self, redis: Redis, pg: asyncpg.Pool, keys: KeySpace) -> None:
        self.redis = redis
        self.pg = pg
        self.keys = keys

    async def put(self, tenant: str, listing: str, body: Listing) -> tuple[ListingState, bool]:
        """Creates or replaces a listing; returns its state and whether it was created."""
        shard = self.keys.shard_of(tenant, listing)
        if not await self.redis.exists(self.keys.ready(shard)):
            raise NotReady.for_shard(shard)  # a rebuild would overwrite what we write now with PostgreSQL's copy
        components = orjson.dumps([c.model_dump() for c in body.components]).decode()
        created = bool(await self.pg.fetchval(UPSERT, tenant, listing, components))
        await self.redis.set(self.keys.listing(shard, tenant, listing), components)
        return ListingState(listing=listing, components=body.components), created

    async def get(self, tenant: str, listing: str) -> ListingState:
        (components,) = await self._components(tenant, [listing])
        return ListingState(listing=listing, components=components)

    async def expand(self, request: ReservationRequest, tenant: str) -> ReservationRequest:
        """The request with its listing lines turned into SKU lines (merged with the others): what the
        stock engine reserves. A request without listings is returned as it is."""
        if not request.listings:
            return request
        found = await self._components(tenant, [line.listing for line in request.listings])
        quantities: dict[str, int] = {item.sku: item.quantity for item in request.items}
        for line, components in zip(request.listings, found, strict=True):
            for c in components:
                quantities[c.sku] = quantities.get(c.sku, 0) + c.quantity * line.quantity
        if len(quantities) > MAX_LINES or max(quantities.values()) > MAX_QUANTITY:
            raise ReservationTooLarge(
                f"the listings expand to {len(quantities)} SKU lines of up to {max(quantities.values())} units; "
                f"a reservation holds at most {MAX_LINES} SKUs of at most {MAX_QUANTITY} units each",
                lines=len(quantities),
                largest=max(quantities.values()),
            )
        items = [ReservationItem.model_construct(sku=sku, quantity=q) for sku, q in quantities.items()]
        return request.model_copy(update={"items": items, "listings": []})

    async def _components(self, tenant: str, listings: Sequence[str]) -> list[list[ListingComponent]]:
        shards = [self.keys.shard_of(tenant, name) for name in listings]
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard, name in zip(shards, listings, strict=True):
                pipe.exists(self.keys.ready(shard))
                pipe.get(self.keys.listing(shard, tenant, name))
            replies = await pipe.execute()
        out = []
        for i, (shard, name) in enumerate(zip(shards, listings, strict=True)):
            ready, stored = replies[2 * i], replies[2 * i + 1]
            if not ready:
                raise NotReady.for_shard(shard)
            if stored is None:
                raise ListingNotFound(f"listing {name!r} does not exist", listing=name)
            out.append([ListingComponent.model_construct(**c) for c in orjson.loads(stored)])
        return out
