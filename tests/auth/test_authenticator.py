"""The per-process key cache and its epoch (app/auth/authenticator.py, app/auth/epoch.py), against the
suite's real Redis and PostgreSQL: cache hits cost no query, a revocation binds a process as soon as
its refresh has read the epoch, and a process that cannot read the epoch stops trusting its cache."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from app.auth.authenticator import Authenticator
from app.auth.epoch import TRUST_MS, ack_value, announce_change, await_acknowledgements, redis_ms
from app.auth.errors import Unauthenticated
from app.auth.scopes import Principal, Scope
from app.auth.store import Credential, KeyStore
from app.auth.tokens import ApiKey
from app.stock.keys import KeySpace

KEYS = KeySpace(16)


class CountingStore(KeyStore):
    """The real store, counting the lookups the authenticator makes (and able to hold one back)."""

    lookups = 0
    gate: asyncio.Event | None = None
    read = asyncio.Event()

    async def credential(self, key_id: str) -> Credential | None:
        self.lookups += 1
        found = await super().credential(key_id)
        self.read.set()
        if self.gate is not None:
            await self.gate.wait()
        return found


@pytest_asyncio.fixture
async def store(key_store: KeyStore) -> CountingStore:
    return CountingStore(key_store.pg)


def authenticator(store: KeyStore, redis: Redis, name: str = "test-process") -> Authenticator:
    return Authenticator(store, redis, KEYS, refresh_ms=20, process=name)


@pytest_asyncio.fixture
async def running(store: CountingStore, redis: Redis) -> AsyncIterator[Authenticator]:
    """An authenticator whose epoch loop runs, as in an API process."""
    auth = authenticator(store, redis)
    stop = asyncio.Event()
    task = asyncio.create_task(auth.run(stop))
    await auth.refresh()
    yield auth
    stop.set()
    await task


async def test_a_valid_key_gives_its_tenant_and_scope_and_a_hit_costs_no_query(
    running: Authenticator, store: CountingStore
) -> None:
    record, key = await store.create("acme", Scope.CHECKOUT)

    first = await running.authenticate(key.token)
    second = await running.authenticate(key.token)

    assert first == second == Principal("acme", frozenset({Scope.CHECKOUT}), record.id)
    assert store.lookups == 1


async def test_wrong_secret_unknown_and_malformed_keys_are_refused(
    running: Authenticator, store: CountingStore
) -> None:
    _, key = await store.create("acme", Scope.ADMIN)
    wrong_secret = ApiKey(key.id, ("B" if key.secret[0] == "A" else "A") + key.secret[1:])

    for token in (wrong_secret.token, ApiKey("aaaaaaaaaaaa", key.secret).token, "shk_nope", key.token + "x"):
        with pytest.raises(Unauthenticated) as refused:
            await running.authenticate(token)
        assert refused.value.error == "invalid_token"
    # an unknown id is remembered: asking again costs no query
    before = store.lookups
    with pytest.raises(Unauthenticated):
        await running.authenticate(ApiKey("aaaaaaaaaaaa", key.secret).token)
    assert store.lookups == before


async def test_a_revocation_binds_once_the_epoch_is_read(
    redis: Redis, store: CountingStore, running: Authenticator
) -> None:
    # given a key the process has cached
    record, key = await store.create("acme", Scope.CHECKOUT)
    await running.authenticate(key.token)

    # when it is revoked in PostgreSQL and the epoch bumped
    await store.revoke(record.id)
    announced = await announce_change(redis, KEYS)
    barrier = await await_acknowledgements(redis, KEYS, announced.epoch)

    # then, once the barrier returns, the process refuses it
    assert barrier.acknowledged == ["test-process"]
    assert barrier.complete
    with pytest.raises(Unauthenticated):
        await running.authenticate(key.token)


async def test_the_cache_hides_a_revocation_nobody_announced_for_at_most_the_trust_window(
    redis: Redis, store: CountingStore
) -> None:
    # given a process whose epoch loop ran once and then stopped (stalled, or Redis unreachable)
    auth = authenticator(store, redis)
    await auth.refresh()
    record, key = await store.create("acme", Scope.READ)
    await auth.authenticate(key.token)
    await store.revoke(record.id)  # no epoch bump: only the trust window protects

    # the cache still answers while trusted...
    assert auth.trusts_cache()
    assert (await auth.authenticate(key.token)).tenant == "acme"

    # ...and past TRUST_MS without a refresh, every key is looked up in PostgreSQL
    await asyncio.sleep(TRUST_MS / 1000 + 0.05)
    assert not auth.trusts_cache()
    with pytest.raises(Unauthenticated):
        await auth.authenticate(key.token)


async def test_with_redis_unreachable_every_request_asks_postgresql(store: CountingStore) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    auth = authenticator(store, dead)
    stop = asyncio.Event()
    task = asyncio.create_task(auth.run(stop))
    try:
        record, key = await store.create("acme", Scope.ADMIN)
        await asyncio.sleep(0.1)

        assert not auth.trusts_cache()
        for _ in range(3):
            assert (await auth.authenticate(key.token)).tenant == "acme"
        assert store.lookups == 3
        await store.revoke(record.id)  # Redis is unreachable: nobody can announce it
        with pytest.raises(Unauthenticated):
            await auth.authenticate(key.token)
    finally:
        stop.set()
        await task
        await dead.aclose()


async def test_a_lookup_answered_after_the_cache_was_dropped_is_not_remembered(
    redis: Redis, store: CountingStore, running: Authenticator
) -> None:
    # given a lookup that read the key before its revocation and answers after the process dropped its cache
    record, key = await store.create("acme", Scope.CHECKOUT)
    store.gate, store.read = asyncio.Event(), asyncio.Event()
    lookup = asyncio.create_task(running.authenticate(key.token))
    await store.read.wait()
    await store.revoke(record.id)
    announced = await announce_change(redis, KEYS)
    assert (await await_acknowledgements(redis, KEYS, announced.epoch)).complete
    store.gate.set()
    store.gate = None

    # then that request, in flight before the revocation, goes through, but the key is not cached
    assert (await lookup).tenant == "acme"
    with pytest.raises(Unauthenticated):
        await running.authenticate(key.token)


async def test_the_barrier_waits_for_every_live_process_and_not_for_silent_ones(
    redis: Redis, store: CountingStore
) -> None:
    # given two live processes, and one that last acknowledged long ago (it stopped trusting its cache)
    stop = asyncio.Event()
    processes = [authenticator(store, redis, f"p{i}") for i in range(2)]
    tasks = [asyncio.create_task(p.run(stop)) for p in processes]
    now = redis_ms(await redis.time())
    await redis.hset(KEYS.auth_acks(), "gone", ack_value(0, now - TRUST_MS - 500))
    try:
        await asyncio.sleep(0.05)

        # when the epoch moves
        announced = await announce_change(redis, KEYS)
        started = time.monotonic()
        result = await await_acknowledgements(redis, KEYS, announced.epoch)

        # then both live processes applied it within a couple of refresh periods
        assert result.acknowledged == ["p0", "p1"]
        assert result.silent == ["gone"]
        assert result.laggards == []
        assert time.monotonic() - started < 0.5
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    # a stopped process withdraws its ack
    assert set(await redis.hkeys(KEYS.auth_acks())) == {"gone"}


async def test_the_barrier_names_a_process_that_keeps_acknowledging_an_old_epoch(redis: Redis) -> None:
    # given a process acknowledging, on time, an epoch older than the new one (e.g. an older release)
    announced = await announce_change(redis, KEYS)
    stop = asyncio.Event()

    async def stuck() -> None:
        while not stop.is_set():
            now = redis_ms(await redis.time())
            await redis.hset(KEYS.auth_acks(), "stuck", ack_value(announced.epoch - 1, now))
            await asyncio.sleep(0.02)

    # stopped by an event, not cancelled: redis-py 8.1 was seen to swallow a cancellation that lands in
    # a command, and the task then wrote on into the next tests' Redis
    task = asyncio.create_task(stuck())
    try:
        await asyncio.sleep(0.05)
        result = await await_acknowledgements(redis, KEYS, announced.epoch, timeout_s=0.3)
    finally:
        stop.set()
        await task

    assert result.laggards == ["stuck"]
    assert not result.complete
    assert result.elapsed_s >= 0.3


async def test_a_quiet_process_records_its_ack_every_heartbeat_not_every_read(
    redis: Redis, store: CountingStore
) -> None:
    # given a process reading the epoch every 20 ms, and no key changing
    auth = authenticator(store, redis)
    stop = asyncio.Event()
    task = asyncio.create_task(auth.run(stop))
    seen: list[str] = []
    try:
        # when its ack is watched for a second
        for _ in range(100):
            value = await redis.hget(KEYS.auth_acks(), "test-process")
            if value is not None and (not seen or seen[-1] != value):
                seen.append(value)
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await task

    # then it wrote about four times (250 ms apart), never leaving a gap a barrier would take for silence
    times = [int(v.split(":")[1]) for v in seen]
    assert 3 <= len(times) <= 6, seen
    assert max(b - a for a, b in itertools.pairwise(times)) < TRUST_MS
