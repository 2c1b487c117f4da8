-- Stock events as signed webhooks (issue 6, part 4). A tenant's endpoints subscribe to event types; a
-- dispatcher reads the shard streams through its own consumer group and turns stock events into webhook
-- events and one delivery per subscribed endpoint (an outbox), in one transaction before it XACKs; a
-- sender POSTs due deliveries and logs every attempt. Per-SKU low-stock thresholds live here too, not in
-- the Redis SKU hash: the Lua hot path does not read them.

CREATE TABLE webhook_endpoint (
    id           text        PRIMARY KEY,             -- wh_<16 base32>, random
    tenant       text        NOT NULL,
    url          text        NOT NULL,
    events       text[]      NOT NULL CHECK (cardinality(events) >= 1),
    description  text,
    secret       text        NOT NULL,                -- the HMAC key: kept, since it must sign
    active       boolean     NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX webhook_endpoint_tenant_idx ON webhook_endpoint (tenant, created_at);

CREATE TABLE sku_alert (
    tenant               text        NOT NULL,
    sku                  text        NOT NULL,
    low_stock_threshold  bigint      NOT NULL CHECK (low_stock_threshold >= 1),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, sku)
);

-- One row per webhook event: its id is what receivers dedupe on, derived from the stream entry (or, for
-- reservation_expired, from the reservation), so replaying an entry inserts nothing new.
CREATE TABLE webhook_event (
    id           text        PRIMARY KEY,
    tenant       text        NOT NULL,
    type         text        NOT NULL,
    payload      jsonb       NOT NULL,                -- the body POSTed, as sent
    shard        integer     NOT NULL,                -- the stream entry it came from
    stream_id    text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_delivery (
    id               bigserial   PRIMARY KEY,
    endpoint_id      text        NOT NULL REFERENCES webhook_endpoint (id) ON DELETE CASCADE,
    event_id         text        NOT NULL REFERENCES webhook_event (id) ON DELETE CASCADE,
    status           text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (endpoint_id, event_id)
);

CREATE INDEX webhook_delivery_due_idx ON webhook_delivery (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_delivery_endpoint_idx ON webhook_delivery (endpoint_id, id DESC);

CREATE TABLE webhook_attempt (
    delivery_id  bigint      NOT NULL REFERENCES webhook_delivery (id) ON DELETE CASCADE,
    attempt      integer     NOT NULL,
    started_at   timestamptz NOT NULL,
    duration_ms  double precision NOT NULL,
    status_code  integer,                             -- null: no answer (timeout, connection refused)
    error        text,                                -- null on a 2xx
    PRIMARY KEY (delivery_id, attempt)
);
