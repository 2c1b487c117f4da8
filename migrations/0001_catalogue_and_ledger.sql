-- The system of record's foundation: the SKU catalogue and the append-only ledger of stock movements,
-- one row per event XADDed by a Lua script (event_id is the stream entry id, unique per shard stream,
-- so persisting an event twice is a no-op). The write-behind worker that fills these arrives with the
-- system-of-record work; until then they are created at start and stay empty.

CREATE TABLE sku (
    tenant            text        NOT NULL,
    sku               text        NOT NULL,
    on_hand           bigint      NOT NULL CHECK (on_hand >= 0),
    safety_stock      bigint      NOT NULL DEFAULT 0 CHECK (safety_stock >= 0),
    held              bigint      NOT NULL DEFAULT 0 CHECK (held >= 0),
    sold              bigint      NOT NULL DEFAULT 0 CHECK (sold >= 0),
    mode              text        NOT NULL DEFAULT 'pre_reserve'
                                  CHECK (mode IN ('pre_reserve', 'on_order', 'on_payment')),
    hold_ttl_seconds  integer     NOT NULL DEFAULT 900 CHECK (hold_ttl_seconds BETWEEN 1 AND 86400),
    per_user_limit    bigint      CHECK (per_user_limit >= 1),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, sku)
);

CREATE TABLE stock_movement (
    shard           integer     NOT NULL,
    event_id        text        NOT NULL,
    tenant          text        NOT NULL,
    sku             text        NOT NULL,
    kind            text        NOT NULL,
    quantity        bigint      NOT NULL,
    reservation_id  text,
    user_id         text,
    on_hand_after   bigint      NOT NULL,
    held_after      bigint      NOT NULL,
    sold_after      bigint      NOT NULL,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (shard, event_id)
);

CREATE INDEX stock_movement_sku_idx ON stock_movement (tenant, sku, occurred_at);
