"""API keys in PostgreSQL (app/auth/store.py): created with their tenant, listed without secrets,
revoked idempotently, looked up only while live."""

from __future__ import annotations

import asyncpg
import pytest

from app.auth.errors import InvalidTenant, UnknownKey
from app.auth.scopes import Scope
from app.auth.store import KeyStore
from app.auth.tokens import secret_digest


async def test_create_stores_only_the_secrets_digest_and_creates_the_tenant(
    key_store: KeyStore, pg_pool: asyncpg.Pool
) -> None:
    record, key = await key_store.create("acme", Scope.CHECKOUT, "web shop")

    assert (record.id, record.tenant, record.scope, record.name, record.revoked_at) == (
        key.id,
        "acme",
        Scope.CHECKOUT,
        "web shop",
        None,
    )
    row = await pg_pool.fetchrow("SELECT * FROM api_key WHERE id = $1", key.id)
    assert row is not None
    assert bytes(row["secret_sha256"]) == secret_digest(key.secret)
    assert key.secret not in str(dict(row))
    assert await pg_pool.fetchval("SELECT count(*) FROM tenant WHERE id = 'acme'") == 1

    await key_store.create("acme", Scope.READ)  # the tenant exists already: fine
    assert await pg_pool.fetchval("SELECT count(*) FROM tenant") == 1


@pytest.mark.parametrize("tenant", ["", "a:b", "a b", "{7}", "-lead", "x" * 65, "ünï"])
async def test_a_tenant_must_be_of_the_sku_id_form(key_store: KeyStore, tenant: str) -> None:
    with pytest.raises(InvalidTenant):
        await key_store.create(tenant, Scope.ADMIN)


async def test_list_shows_live_keys_by_tenant_and_revoked_ones_on_request(key_store: KeyStore) -> None:
    a1, _ = await key_store.create("a", Scope.ADMIN)
    a2, _ = await key_store.create("a", Scope.READ)
    b1, _ = await key_store.create("b", Scope.CHECKOUT)
    await key_store.revoke(a2.id)

    assert [k.id for k in await key_store.list_keys()] == [a1.id, b1.id]
    assert [k.id for k in await key_store.list_keys("a")] == [a1.id]
    listed = await key_store.list_keys("a", include_revoked=True)
    assert [k.id for k in listed] == [a1.id, a2.id]
    assert listed[1].revoked_at is not None


async def test_revoke_is_idempotent_and_keeps_the_first_time(key_store: KeyStore) -> None:
    record, _ = await key_store.create("a", Scope.ADMIN)

    first = await key_store.revoke(record.id)
    again = await key_store.revoke(record.id)

    assert first.revoked_at is not None
    assert again.revoked_at == first.revoked_at


async def test_revoking_an_unknown_id_raises(key_store: KeyStore) -> None:
    with pytest.raises(UnknownKey):
        await key_store.revoke("aaaaaaaaaaaa")


async def test_credential_is_found_only_while_the_key_is_live(key_store: KeyStore) -> None:
    record, key = await key_store.create("a", Scope.CHECKOUT)

    credential = await key_store.credential(key.id)
    assert credential is not None
    assert (credential.tenant, credential.scope, credential.secret_sha256) == (
        "a",
        Scope.CHECKOUT,
        secret_digest(key.secret),
    )

    await key_store.revoke(record.id)
    assert await key_store.credential(key.id) is None
    assert await key_store.credential("bbbbbbbbbbbb") is None
