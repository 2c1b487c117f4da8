-- The rest of the system of record: reservations with their lines, statuses and deadlines; the
-- worker's progress per shard; and, on the catalogue, which event each row reflects.
--
-- Every projection row remembers the stream id (ms, seq) of the event it reflects and is only ever
-- overwritten by a later event of the same shard stream: the worker and confirm's write-through may
-- persist events out of order (a redelivered batch, a confirm written through before the worker reached
-- the hold), and the newest event still wins.

ALTER TABLE sku
    ADD COLUMN event_ms           bigint NOT NULL DEFAULT 0,
    ADD COLUMN event_seq          bigint NOT NULL DEFAULT 0,
    ADD COLUMN settings_event_ms  bigint NOT NULL DEFAULT 0,
    ADD COLUMN settings_event_seq bigint NOT NULL DEFAULT 0;

COMMENT ON COLUMN sku.held IS 'held after the newest persisted event of this SKU (Redis is the live counter)';
COMMENT ON COLUMN sku.sold IS 'sold after the newest persisted event of this SKU (Redis is the live counter)';

-- One row per reservation: its document (items in the order asked, channel), written by the event that
-- created its home part or by confirm's write-through, whichever comes first. Immutable.
CREATE TABLE reservation (
    id          text        PRIMARY KEY,
    tenant      text        NOT NULL,
    user_id     text        NOT NULL,
    channel     text,
    items       jsonb       NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz
);

-- One row per reservation line (a reservation names each SKU once). A reservation's lines on one shard
-- form its part there and share one status; status is the part's after the newest event.
CREATE TABLE reservation_line (
    reservation_id  text    NOT NULL,
    sku             text    NOT NULL,
    shard           integer NOT NULL,
    tenant          text    NOT NULL,
    user_id         text    NOT NULL,
    quantity        bigint  NOT NULL CHECK (quantity > 0),
    held            boolean NOT NULL,  -- holds stock while its part is held (false: an on_payment line)
    status          text    NOT NULL
                            CHECK (status IN ('held', 'pending', 'confirmed', 'released', 'expired', 'undone')),
    status_before   text,              -- a confirmed part's status before its confirm
    confirmed_how   text    CHECK (confirmed_how IN ('h', 'd')),  -- from the hold, or deducted directly
    expires_at_ms   bigint,            -- the part's deadline, 0 for none; NULL until its reserve event lands
    created_at_ms   bigint,
    event_ms        bigint  NOT NULL,
    event_seq       bigint  NOT NULL,
    PRIMARY KEY (reservation_id, sku)
);

CREATE INDEX reservation_line_shard_idx ON reservation_line (shard, status);
CREATE INDEX reservation_line_sku_idx ON reservation_line (tenant, sku) WHERE status IN ('held', 'confirmed');

-- How far the write-behind worker got on each shard stream.
CREATE TABLE worker_progress (
    shard            integer     PRIMARY KEY,
    last_event_id    text        NOT NULL,
    last_event_ms    bigint      NOT NULL,
    last_event_seq   bigint      NOT NULL,
    events_persisted bigint      NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- The moment a row is written rather than the transaction's start: lag measurements use it.
ALTER TABLE stock_movement ALTER COLUMN recorded_at SET DEFAULT clock_timestamp();
