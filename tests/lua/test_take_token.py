"""take_token-1.lua called directly: a token bucket's burst, its refill, the wait it reports, its expiry."""

from __future__ import annotations

from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.scripts import Scripts
from tests.lua.support import NOW


async def take(scripts: Scripts, key: str, now: int, rate: float = 2, burst: int = 3) -> list[int]:
    return [int(v) for v in await scripts.call("take_token", [key], [now, rate, burst])]


async def test_a_full_bucket_allows_its_burst_then_refuses_until_a_token_refills(
    redis: Redis, scripts: Scripts, keys: KeySpace
) -> None:
    key = keys.rate_bucket("user", "default:ann")

    # a new bucket is full: 3 at once, then refused with the wait for the next token (2/s: 500 ms)
    assert [await take(scripts, key, NOW) for _ in range(3)] == [[1, 2], [1, 1], [1, 0]]
    assert await take(scripts, key, NOW) == [0, 500]
    before = await redis.hgetall(key)  # type: ignore[misc]
    assert await take(scripts, key, NOW + 200) == [0, 300]  # a refusal changes nothing
    assert await redis.hgetall(key) == before  # type: ignore[misc]

    # one token 500 ms later, and no more than the burst however long it was idle
    assert await take(scripts, key, NOW + 500) == [1, 0]
    assert await take(scripts, key, NOW + 500) == [0, 500]
    assert await take(scripts, key, NOW + 60_000) == [1, 2]


async def test_buckets_are_separate_and_expire_once_full_again(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    ann, bob = keys.rate_bucket("user", "default:ann"), keys.rate_bucket("user", "default:bob")
    for _ in range(3):
        await take(scripts, ann, NOW)
    assert (await take(scripts, ann, NOW))[0] == 0
    assert (await take(scripts, bob, NOW))[0] == 1  # bob's bucket is his own

    # ann's empty bucket refills in 1.5 s: the key lives about that long (plus a second), not forever
    assert 1500 < await redis.pttl(ann) <= 2500


async def test_a_bucket_needs_no_marker(redis: Redis, scripts: Scripts, keys: KeySpace) -> None:
    """take_token touches its bucket only, never stock, so it runs while shards await a rebuild."""
    await redis.delete(*(keys.ready(shard) for shard in keys.all_shards()))
    key = keys.rate_bucket("ip", "203.0.113.9")
    assert await take(scripts, key, NOW) == [1, 2]
    assert await redis.dbsize() == 1  # the bucket alone
