"""Loads the Lua scripts in ``lua/`` and calls them by SHA.

File names carry the contract, as in BullMQ: ``verb_noun-<numkeys>.lua`` for a fixed key count, plain
``verb_noun.lua`` for a variable one (its header documents the layout). ``--@include name`` lines are
replaced by ``lua/includes/name.lua`` before hashing, so there is no hand-kept registry and no Lua inside
Python strings.

Calls are EVALSHA, coalesced with the other calls of the same event-loop tick into one pipeline
(app/store/batching.py); on NOSCRIPT (Redis restarted, flushed, or a new cluster primary) redis-py's
``AsyncScript`` does SCRIPT LOAD then EVALSHA again. A call given a ``client`` (a MULTI pipeline) goes
through that client instead. On a Redis Cluster the calls go to each slot's primary, one pipeline per
node ending in WAIT (app/store/cluster.py).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from app.store.batching import ScriptBatcher
from app.store.cluster import ClusterScriptBatcher, is_cluster

LUA_DIR = Path(__file__).resolve().parents[2] / "lua"
_INCLUDE = re.compile(r"^--@include\s+(\w+)\s*$", re.MULTILINE)
_NAME = re.compile(r"^(?P<name>[a-z_]+)(?:-(?P<numkeys>\d+))?$")

Arg = str | int | float | bytes
# On a cluster, replies wait until this many replicas of the node have the change (at most the node's replica
# count), or this long (app/store/cluster.py); Settings carries the deployment's values.
DEFAULT_WAIT_REPLICAS = 1
DEFAULT_WAIT_TIMEOUT_MS = 100


@dataclass(frozen=True, slots=True)
class LuaSource:
    name: str
    numkeys: int | None  # None: variable, the caller passes the keys
    body: str


def _inline(body: str, includes: Path, seen: frozenset[str] = frozenset()) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in seen:
            raise ValueError(f"include cycle through {name!r}")
        path = includes / f"{name}.lua"
        return _inline(path.read_text(), includes, seen | {name})

    return _INCLUDE.sub(replace, body)


def read_sources(lua_dir: Path = LUA_DIR) -> dict[str, LuaSource]:
    sources: dict[str, LuaSource] = {}
    for path in sorted(lua_dir.glob("*.lua")):
        match = _NAME.match(path.stem)
        if match is None:
            raise ValueError(f"{path.name}: Lua files are named verb_noun[-numkeys].lua")
        numkeys = match.group("numkeys")
        sources[match.group("name")] = LuaSource(
            name=match.group("name"),
            numkeys=int(numkeys) if numkeys is not None else None,
            body=_inline(path.read_text(), lua_dir / "includes"),
        )
    return sources


class Scripts:
    """The loaded scripts of one Redis connection, called by name."""

    def __init__(
        self,
        redis: Redis,
        lua_dir: Path = LUA_DIR,
        *,
        wait_replicas: int = DEFAULT_WAIT_REPLICAS,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        self._redis = redis
        self.sources = read_sources(lua_dir)
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(src.body) for name, src in self.sources.items()
        }
        self._batcher: ScriptBatcher | ClusterScriptBatcher
        if is_cluster(redis):
            self._batcher = ClusterScriptBatcher(redis, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)
        else:
            self._batcher = ScriptBatcher(redis)

    async def load(self) -> None:
        """SCRIPT LOAD every script once at start, so the first requests do not pay for it."""
        # On a cluster, every node, replicas included: a promoted replica then needs no NOSCRIPT round.
        for src in self.sources.values():
            if is_cluster(self._redis):
                await self._redis.execute_command(  # type: ignore[no-untyped-call]
                    "SCRIPT LOAD", src.body, target_nodes=RedisCluster.ALL_NODES
                )
            else:
                await self._redis.script_load(src.body)

    def on_lost_writes(self, callback: Callable[[list[int]], Awaitable[None]]) -> None:
        """On a cluster: `callback(slots)` runs when a primary whose replica fell behind acknowledged writes
        was failed over, before any call reaches the replica promoted in its place (app/store/cluster.py)."""
        if isinstance(self._batcher, ClusterScriptBatcher):
            self._batcher.on_lost_writes = callback

    @property
    def replication_waits(self) -> int:
        """Pipelines that ended in WAIT (on a cluster with replicas; 0 on one Redis)."""
        return self._batcher.waits_sent if isinstance(self._batcher, ClusterScriptBatcher) else 0

    @property
    def replication_shortfalls(self) -> int:
        """Pipelines whose WAIT saw fewer replicas than asked within the timeout."""
        return self._batcher.wait_shortfalls if isinstance(self._batcher, ClusterScriptBatcher) else 0

    def sha(self, name: str) -> str:
        return str(self._scripts[name].sha)

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Arg], client: Any = None) -> Any:
        src = self.sources[name]
        if src.numkeys is not None and len(keys) != src.numkeys:
            raise ValueError(f"{name} takes {src.numkeys} keys, got {len(keys)}")
        if client is not None:
            return await self._scripts[name](keys=list(keys), args=list(args), client=client)
        script = self._scripts[name]
        try:
            return await self._batcher.call(str(script.sha), keys, args)
        except NoScriptError:
            # Redis lost its script cache (restart, flush, failover): the Script loads it and calls again
            return await script(keys=list(keys), args=list(args))
