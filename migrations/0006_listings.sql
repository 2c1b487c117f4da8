-- Listings: a storefront's product mapped to the SKUs it is made of (a bundle: several SKUs, each a
-- number of times). A listing moves no stock, so it is not an event: `PUT /v1/listings/{listing}` writes
-- this row first (the system of record) and then the listing's key in Redis, which reservations read.
-- A rebuild writes the keys of its shards back from here; reconcile compares the two.

CREATE TABLE listing (
    tenant      text        NOT NULL,
    listing     text        NOT NULL,
    components  jsonb       NOT NULL,  -- [{"sku": ..., "quantity": ...}], distinct SKUs, in order
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, listing)
);
