"""API keys in PostgreSQL (migrations/0005_tenants_and_api_keys.sql): create, list, revoke, and the
lookup the authenticator makes on a cache miss."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from app.auth.errors import InvalidTenant, UnknownKey
from app.auth.scopes import Scope
from app.auth.tokens import ApiKey, new_key, secret_digest
from app.stock.schemas import SKU_PATTERN

# Tenant ids follow the SKU-id form: they are part of Redis key names (sh:{s}:sku:<tenant>:<sku>), so
# no colons, spaces or braces.
_TENANT = re.compile(SKU_PATTERN)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as `keys list` shows it: never the secret, which is not stored."""

    id: str
    tenant: str
    scope: Scope
    name: str | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Credential:
    """What a request's key is checked against: the tenant, the scope and the secret's digest."""

    tenant: str
    scope: Scope
    secret_sha256: bytes


def validate_tenant(tenant: str) -> str:
    if not _TENANT.fullmatch(tenant):
        raise InvalidTenant(f"tenant {tenant!r}: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return tenant


def _record(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(row["id"], row["tenant"], Scope(row["scope"]), row["name"], row["created_at"], row["revoked_at"])


class KeyStore:
    def __init__(self, pg: asyncpg.Pool) -> None:
        self.pg = pg

    async def create(self, tenant: str, scope: Scope, name: str | None = None) -> tuple[KeyRecord, ApiKey]:
        """A new key for ``tenant`` (created if new), in one transaction. The returned ApiKey holds the
        only copy of the secret there will ever be."""
        validate_tenant(tenant)
        key = new_key()
        async with self.pg.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO tenant (id) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
            row = await conn.fetchrow(
                """INSERT INTO api_key (id, tenant, scope, name, secret_sha256) VALUES ($1, $2, $3, $4, $5)
                   RETURNING id, tenant, scope, name, created_at, revoked_at""",
                key.id,
                tenant,
                scope.value,
                name,
                secret_digest(key.secret),
            )
        assert row is not None
        return _record(row), key

    async def list_keys(self, tenant: str | None = None, include_revoked: bool = False) -> list[KeyRecord]:
        rows = await self.pg.fetch(
            """SELECT id, tenant, scope, name, created_at, revoked_at FROM api_key
               WHERE ($1::text IS NULL OR tenant = $1) AND ($2 OR revoked_at IS NULL)
               ORDER BY tenant, created_at, id""",
            tenant,
            include_revoked,
        )
        return [_record(r) for r in rows]

    async def revoke(self, key_id: str) -> KeyRecord:
        """Marks the key revoked (idempotent: a revoked key keeps its first revocation time). Raises
        UnknownKey for an id never issued. API processes learn of it through the epoch (epoch.py)."""
        row = await self.pg.fetchrow(
            """UPDATE api_key SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
               RETURNING id, tenant, scope, name, created_at, revoked_at""",
            key_id,
        )
        if row is None:
            raise UnknownKey(f"no API key with id {key_id!r}")
        return _record(row)

    async def credential(self, key_id: str) -> Credential | None:
        """The live (not revoked) key with this id, or None."""
        row = await self.pg.fetchrow(
            "SELECT tenant, scope, secret_sha256 FROM api_key WHERE id = $1 AND revoked_at IS NULL", key_id
        )
        return Credential(row["tenant"], Scope(row["scope"]), bytes(row["secret_sha256"])) if row else None
