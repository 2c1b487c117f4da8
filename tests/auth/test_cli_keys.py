"""`stockhold keys create | list | revoke` as an operator runs them: real processes against the suite's
Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from app.auth.authenticator import Authenticator
from app.auth.errors import Unauthenticated
from app.auth.scopes import Scope
from app.auth.store import KeyStore
from app.stock.keys import KeySpace
from tests.conftest import Servers
from tests.processes import REPO

CLI_TIMEOUT_S = 60
KEY = re.compile(r"shk_[a-z2-7]{12}_[A-Za-z0-9_-]{43}")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


async def keys_cli(servers: Servers, *args: str) -> Run:
    env = {**os.environ, "REDIS_URL": servers.redis_url, "DATABASE_URL": servers.database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        "keys",
        *args,
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def test_create_prints_the_key_once_alone_on_stdout(servers: Servers, key_store: KeyStore) -> None:
    run = await keys_cli(servers, "create", "--tenant", "acme", "--scope", "checkout", "--name", "web shop")

    assert run.code == 0, run.stderr
    assert KEY.fullmatch(run.stdout.strip()), run.stdout
    assert "shown only this once" in run.stderr
    assert "tenant 'acme', scope checkout, name 'web shop'" in run.stderr
    [record] = await key_store.list_keys("acme")
    assert run.stdout.strip().startswith(f"shk_{record.id}_")
    assert record.scope == Scope.CHECKOUT


async def test_create_refuses_a_bad_tenant_or_scope(servers: Servers, key_store: KeyStore) -> None:
    bad_tenant = await keys_cli(servers, "create", "--tenant", "a:b", "--scope", "admin")
    bad_scope = await keys_cli(servers, "create", "--tenant", "acme", "--scope", "root")

    assert bad_tenant.code == 2 and "--tenant" in bad_tenant.stderr
    assert bad_scope.code == 2
    assert await key_store.list_keys(include_revoked=True) == []


async def test_list_shows_ids_never_secrets(servers: Servers, key_store: KeyStore) -> None:
    a, a_key = await key_store.create("acme", Scope.ADMIN, "ops")
    b, b_key = await key_store.create("beta", Scope.READ)
    revoked, revoked_key = await key_store.create("acme", Scope.CHECKOUT)
    await key_store.revoke(revoked.id)

    live = await keys_cli(servers, "list")
    acme_all = await keys_cli(servers, "list", "--tenant", "acme", "--all")

    assert live.code == acme_all.code == 0
    assert live.stdout.splitlines()[0].split() == ["id", "tenant", "scope", "name", "created", "revoked"]
    assert [line.split()[:3] for line in live.stdout.splitlines()[1:]] == [
        [a.id, "acme", "admin"],
        [b.id, "beta", "read"],
    ]
    assert [line.split()[0] for line in acme_all.stdout.splitlines()[1:]] == [a.id, revoked.id]
    for out in (live.stdout, acme_all.stdout):
        for key in (a_key, b_key, revoked_key):
            assert key.secret not in out
        assert not KEY.search(out)


async def test_revoke_waits_for_the_running_api_processes_and_is_idempotent(
    servers: Servers, redis: Redis, key_store: KeyStore
) -> None:
    # given an API process (in this test's event loop) that has the key cached
    auth = Authenticator(key_store, redis, KeySpace(16), refresh_ms=50, process="api-1")
    stop = asyncio.Event()
    task = asyncio.create_task(auth.run(stop))
    try:
        record, key = await key_store.create("acme", Scope.CHECKOUT)
        await asyncio.sleep(0.1)
        assert (await auth.authenticate(key.token)).tenant == "acme"

        # when the operator revokes it
        run = await keys_cli(servers, "revoke", record.id)

        # then the process acknowledged before the command returned, and refuses the key
        assert run.code == 0, run.stderr
        assert f"revoked API key {record.id} (tenant 'acme', scope checkout)" in run.stdout
        assert re.search(r"every API process refuses it: 1 acknowledged in \d+ ms", run.stdout), run.stdout
        with pytest.raises(Unauthenticated):
            await auth.authenticate(key.token)
        again = await keys_cli(servers, "revoke", record.id)
        assert again.code == 0, again.stderr
    finally:
        stop.set()
        await task


async def test_revoking_an_unknown_id_exits_1(servers: Servers, key_store: KeyStore) -> None:
    run = await keys_cli(servers, "revoke", "aaaaaaaaaaaa")

    assert run.code == 1
    assert "no API key with id 'aaaaaaaaaaaa'" in run.stderr
