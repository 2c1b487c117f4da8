-- Tenants and their API keys (issue 5). Every SKU, reservation, idempotency record and event already
-- carries a tenant string; a tenant row is created with its first key (`stockhold keys create`).
--
-- A key is `shk_<id>_<secret>`. The id is public (the lookup handle `keys list` shows); only the SHA-256
-- of the secret is kept, never the secret itself: a database dump gives no usable key. A plain digest,
-- not a slow password hash, because the secret is 256 random bits, not something a person chose: there
-- is no dictionary to try, and a slow hash would cost every request milliseconds for nothing.
-- A revoked key keeps its row (revoked_at set), so `keys list --all` still shows who had access.

CREATE TABLE tenant (
    id          text        PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_key (
    id             text        PRIMARY KEY,
    tenant         text        NOT NULL REFERENCES tenant (id),
    scope          text        NOT NULL CHECK (scope IN ('admin', 'checkout', 'read')),
    name           text,
    secret_sha256  bytea       NOT NULL CHECK (length(secret_sha256) = 32),
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz
);

CREATE INDEX api_key_tenant_idx ON api_key (tenant, created_at);
