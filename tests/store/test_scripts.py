"""The Lua loader: names and key counts come from file names, includes are inlined, every script is
documented, and calls survive a Redis that lost its script cache (NOSCRIPT fallback)."""

from __future__ import annotations

import re

import pytest
from redis.asyncio import Redis

from app.stock.keys import KeySpace
from app.store.scripts import LUA_DIR, Scripts, read_sources


def test_names_and_key_counts_come_from_file_names() -> None:
    sources = read_sources()
    assert {path.stem.split("-")[0] for path in LUA_DIR.glob("*.lua")} == set(sources)
    assert sources["set_sku"].numkeys == 4
    assert sources["claim_idempotency"].numkeys == 1
    assert sources["reserve"].numkeys is None


def test_includes_are_inlined_and_headers_document_every_script() -> None:
    for name, source in read_sources().items():
        assert not re.search(r"^--@include", source.body, re.MULTILINE), f"{name} kept an include directive"
        header = source.body.split("]]", 1)[0]
        assert header.lstrip().startswith("--[["), f"{name} has no header"
        assert "Input" in header and "Output" in header, f"{name} header lacks Input/Output"
        for match in re.finditer(r"\b(KEYS|ARGV)\[(\d+)\]", source.body.split("]]", 1)[1]):
            if match.group(1) == "KEYS" and source.numkeys is not None:
                assert int(match.group(2)) <= source.numkeys, f"{name} uses {match.group(0)}"


async def test_calls_survive_script_flush(redis: Redis, keys: KeySpace) -> None:
    scripts = Scripts(redis)
    await scripts.load()
    shard = keys.shard_of("default", "x")
    call_keys = [
        keys.sku(shard, "default", "x"),
        keys.events(shard),
        keys.idempotency(shard, "default", "-", "-"),
        keys.ready(shard),
    ]
    args = ["default", "x", 5, 0, "pre_reserve", 60, 0, 1, "", 60, *[0] * 7]  # 7: the purchase policy, off

    await redis.script_flush()  # as after a Redis restart or failover: the SHA is unknown
    assert await redis.script_exists(scripts.sha("set_sku")) == [False]
    reply = await scripts.call("set_sku", call_keys, args)

    assert reply[0] == 1
    assert await redis.script_exists(scripts.sha("set_sku")) == [True]


async def test_wrong_key_count_is_refused_before_redis(redis: Redis) -> None:
    with pytest.raises(ValueError, match="takes 4 keys"):
        await Scripts(redis).call("set_sku", ["only-one"], [])
