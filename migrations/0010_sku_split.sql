-- Hot-SKU splitting (app/stock/buckets.py, app/stock/splitting.py): a SKU's stock spread over K buckets on
-- different shards. The buckets are SKUs of their own (`<sku>~<i>`, bucket 0 the SKU itself), persisted
-- like any SKU through the ledger; what is kept here is only the split: how many buckets reservations are
-- routed over, and the most the SKU ever had (the buckets past K may still hold units until drained).
-- Splitting moves no stock, so it is not an event: `PUT /v1/skus/{sku}/split` writes this row first (the
-- system of record), then bumps the split version in Redis, on which every API process reloads the table.

CREATE TABLE sku_split (
    tenant      text        NOT NULL,
    sku         text        NOT NULL,
    buckets     integer     NOT NULL CHECK (buckets >= 1),
    highest     integer     NOT NULL CHECK (highest >= buckets),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, sku)
);

-- A move of free units between two buckets is two script calls on two shards (a shrink of one, a restock
-- of the other), each atomic with its event and its idempotency record. The move is written here before
-- the first call, and marked finished after the second: a move a crash interrupted is finished by the next
-- rebalance of the SKU, replaying both calls under the same idempotency keys, so its units are moved once.
CREATE TABLE bucket_move (
    id           text        PRIMARY KEY,
    tenant       text        NOT NULL,
    sku          text        NOT NULL,
    from_bucket  integer     NOT NULL,
    to_bucket    integer     NOT NULL,
    units        bigint      NOT NULL CHECK (units > 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    outcome      text        -- 'moved', or 'refused' when the source no longer had the units
);

CREATE INDEX bucket_move_unfinished ON bucket_move (tenant, sku) WHERE finished_at IS NULL;
