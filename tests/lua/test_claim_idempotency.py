"""claim_idempotency-1.lua called directly: first claim, retry before an answer, replay of the answer,
IDEMPOTENCY_CONFLICT, and many retries racing for one key."""

from __future__ import annotations

import asyncio
from collections import Counter

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.scripts import Scripts
from tests.helpers import snapshot
from tests.lua.support import IDEM_TTL, TENANT, claim, race

SCOPE = "POST /v1/reservations"


def _record(keys: KeySpace, key: str) -> str:
    return keys.idempotency(keys.shard_of_idempotency(TENANT, SCOPE, key), TENANT, SCOPE, key)


async def test_first_claim_stores_fingerprint_and_reference(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    record = _record(keys, "k-1")

    reply = await claim(scripts, record, "fp-1", "rsv_3_aaaaaaaaaaaaaaaa", ttl=600)

    assert reply == [0, "rsv_3_aaaaaaaaaaaaaaaa"]
    assert await redis.hgetall(record) == {"fp": "fp-1", "ref": "rsv_3_aaaaaaaaaaaaaaaa"}
    assert 0 < await redis.ttl(record) <= 600
    assert await redis.dbsize() == 1 + keys.shard_count  # the record, beside the shards' ready markers


async def test_retry_before_an_answer_gets_the_first_reference(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    # given a claim whose operation has not answered yet (e.g. the process crashed)
    record = _record(keys, "k-2")
    await claim(scripts, record, "fp-2", "rsv_1_first00000000000")
    before = await snapshot(redis)

    # when the client retries (the new process picked another id)
    reply = await claim(scripts, record, "fp-2", "rsv_1_second0000000000")

    # then it re-runs with the first id; the record is unchanged (TTL not extended)
    assert reply == [1, "rsv_1_first00000000000"]
    assert await snapshot(redis) == before
    assert 0 < await redis.ttl(record) <= IDEM_TTL


async def test_claim_after_the_answer_replays_it(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    record = _record(keys, "k-3")
    await claim(scripts, record, "fp-3", "rsv_2_ref0000000000000")
    answer = '{"status":201,"body":"{\\"id\\":\\"rsv_2_ref0000000000000\\"}"}'
    await redis.hset(record, "ans", answer)
    before = await snapshot(redis)

    reply = await claim(scripts, record, "fp-3", "rsv_2_other00000000000")

    assert reply == [2, "rsv_2_ref0000000000000", answer]
    assert await snapshot(redis) == before


async def test_idempotency_conflict_for_another_request(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    record = _record(keys, "k-4")
    await claim(scripts, record, "fp-a", "rsv_0_ref0000000000000")
    before_answer = await snapshot(redis)

    assert await claim(scripts, record, "fp-b", "rsv_0_other00000000000") == [-8]
    assert await snapshot(redis) == before_answer

    # and once answered, still a conflict, with the answer kept
    await redis.hset(record, "ans", '{"status":201,"body":"{}"}')
    before = await snapshot(redis)
    assert await claim(scripts, record, "fp-b", "rsv_0_other00000000000") == [-8]
    assert await snapshot(redis) == before


async def test_claims_of_different_keys_are_independent(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    first, second = _record(keys, "k-5"), _record(keys, "k-6")
    assert first != second

    assert await claim(scripts, first, "fp", "rsv_1_one0000000000000") == [0, "rsv_1_one0000000000000"]
    assert await claim(scripts, second, "fp", "rsv_1_two0000000000000") == [0, "rsv_1_two0000000000000"]

    assert await redis.hget(first, "ref") == "rsv_1_one0000000000000"
    assert await redis.hget(second, "ref") == "rsv_1_two0000000000000"


async def test_concurrent_retries_all_get_one_reference(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    record = _record(keys, "k-7")
    refs = [f"rsv_4_{i:016d}" for i in range(200)]

    replies = await asyncio.gather(*(claim(scripts, record, "fp-7", ref) for ref in refs))

    assert Counter(r[0] for r in replies) == {0: 1, 1: 199}
    winner = next(ref for ref, r in zip(refs, replies, strict=True) if r[0] == 0)
    assert all(r[1] == winner for r in replies)
    assert await redis.hgetall(record) == {"fp": "fp-7", "ref": winner}


async def test_concurrent_claims_with_two_requests_one_key_one_wins(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    record = _record(keys, "k-8")

    a_replies, b_replies = await race(
        [claim(scripts, record, "fp-a", f"rsv_5_a{i:015d}") for i in range(100)],
        [claim(scripts, record, "fp-b", f"rsv_5_b{i:015d}") for i in range(100)],
    )

    # then the request that claimed first owns the key; every claim of the other is a conflict
    stored = await redis.hgetall(record)
    winners, losers = (a_replies, b_replies) if stored["fp"] == "fp-a" else (b_replies, a_replies)
    assert losers == [[-8]] * 100
    assert Counter(r[0] for r in winners) == {0: 1, 1: 99}
    assert {r[1] for r in winners} == {stored["ref"]}
