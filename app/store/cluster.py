"""Redis Cluster: the client, and the script batcher that sends each node its own pipeline.

Every script call touches keys of one shard, and every key of a shard carries the shard's hash tag, so a
call is always one slot on one node (app/stock/keys.py). Nothing about the scripts changes on a cluster;
what changes is where their bytes go:

- Calls are coalesced per event-loop tick as on a single Redis (app/store/batching.py), then grouped by
  the primary that serves each call's slot; each group leaves in one write on that node's own connection.
- Each group ends with ``WAIT <replicas> <timeout>``, and its callers hear their replies only after the
  WAIT: a hold, a confirmation or a restock that stockhold acknowledged is on the primary's replica too, so
  a failover that promotes it loses no acknowledged change. WAIT counts the whole replication stream up to
  that point, so one WAIT per group covers every call in it. A replica that does not answer in time does not
  fail the calls (they ran): the shortfall is logged and counted in `wait_shortfalls`.
- A call answered MOVED/ASK/TRYAGAIN/CLUSTERDOWN did not run: the slot map is reloaded and the call sent
  again, at most REDIRECT_ATTEMPTS times. A node that breaks mid-reply fails its waiting calls like a lost
  single Redis (the caller answers 503) and has the slot map reloaded in the background, so calls find the
  promoted replica as soon as the cluster has elected it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.event import AsyncAfterSlotsCacheRefreshEvent, AsyncEventListenerInterface
from redis.exceptions import AskError, ClusterDownError, MovedError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.store.batching import MAX_BATCH, pack_evalsha

log = logging.getLogger(__name__)

SCHEME = "redis+cluster"
REDIRECT_ATTEMPTS = 3
REFRESH_GAP_S = 0.25  # slot map reloads after failures are at most this frequent
_REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)


class ReplicationLag(Exception):
    """The replica did not acknowledge what was read within the WAIT timeout: the entries stay pending."""


def cluster_nodes(url: str) -> list[tuple[str, int]] | None:
    """The startup nodes of a ``redis+cluster://host:port[,host:port...]`` URL; None for any other URL."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        return None
    nodes = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{SCHEME} URL: expected host:port[,host:port...], got {item!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def connect_cluster(
    nodes: Sequence[tuple[str, int]], *, pool_size: int, socket_timeout: float, connect_timeout: float
) -> Redis:
    """A RedisCluster client. Typed as Redis on purpose: for single-slot commands it answers the same API,
    and the few places that must differ (scripts, multi-stream reads, idle-connection resets) ask
    `is_cluster`. Keeping one type spares every signature in the code base a union."""
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        max_connections=pool_size,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        decode_responses=True,
        # During a failover the client retries a few times (backing off) while the slot map is reloaded, then
        # the caller answers 503: a request waits a bounded time, never for the whole election.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
    )
    return cast(Redis, cluster)


@dataclass(slots=True)
class _Call:
    sha: str
    keys: Sequence[Any]
    args: Sequence[Any]
    future: asyncio.Future[Any]
    attempts: int = 0


@dataclass(slots=True)
class _Line:
    """A connection to one node the batcher writes on while replies are awaited (oldest first)."""

    node: ClusterNode
    conn: Any
    waiting: deque[asyncio.Future[Any]] = field(default_factory=deque)
    reader: asyncio.Task[None] | None = None
    closed: bool = False


class ClusterScriptBatcher:
    def __init__(
        self,
        cluster: Redis,
        *,
        wait_replicas: int = 1,
        wait_timeout_ms: int = 100,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._cluster = cast(RedisCluster, cluster)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._max_batch = max_batch
        self._queue: list[_Call] = []
        self._lines: dict[str, _Line] = {}
        self._opening = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        # Lost-write fence: the nodes whose WAIT fell short (their replica may lack what was acknowledged), and
        # the primary each slot's calls last went to. When a slot's primary changes away from such a node, the
        # replica promoted may have lost acknowledged changes: `on_lost_writes(slots)` runs (the service
        # takes those shards out of service to be rebuilt from PostgreSQL) before any call reaches the new
        # primary. Calls for the slot wait meanwhile.
        self.on_lost_writes: Callable[[list[int]], Awaitable[None]] | None = None
        self._lossy: set[str] = set()
        self._last_primary: dict[int, str] = {}
        self._fences: dict[str, asyncio.Task[None]] = {}
        self._fenced: list[_Call] = []
        self._watch_slot_map_loads()
        self.waits_sent = 0  # groups that ended in WAIT
        self.wait_shortfalls = 0  # groups whose WAIT saw fewer replicas than asked
        self.slot_reloads = 0

    def call(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(_Call(sha, keys, args, future))
        return future

    def _enqueue(self, call: _Call) -> None:
        if not self._queue:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queue.append(call)

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        groups: dict[str, tuple[ClusterNode, int, list[_Call]]] = {}
        manager = self._cluster.nodes_manager
        for call in queue:
            try:
                slot = self._cluster.keyslot(call.keys[0])
                node = manager.get_node_from_slot(slot)
            except Exception as exc:  # no slot map yet, or the slot is not covered
                if not call.future.done():
                    call.future.set_exception(RedisConnectionError(f"no node serves the call's slot: {exc!r}"))
                self._reload_slots()
                continue
            before = self._last_primary.get(slot)
            if before != node.name:
                if before is not None and before in self._lossy:
                    self._fence(before, call)
                    continue
                self._last_primary[slot] = node.name
            replicas = max(0, len(manager.slots_cache.get(slot, [])) - 1)
            groups.setdefault(node.name, (node, replicas, []))[2].append(call)
        for node, replicas, calls in groups.values():
            for start in range(0, len(calls), self._max_batch):
                self._spawn(self._write(node, replicas, calls[start : start + self._max_batch]))

    def _watch_slot_map_loads(self) -> None:
        """Checks for a failover of a lossy node after every load of the slot map, whoever asked for it (a
        failed read, the periodic refresh, this batcher): reads must not go on at the promoted replica either.
        redis-py announces every load with AsyncAfterSlotsCacheRefreshEvent on the nodes manager's dispatcher."""
        batcher = self

        class Listener(AsyncEventListenerInterface):
            async def listen(self, event: object) -> None:
                batcher._check_failovers()

        self._listener = Listener()  # the dispatcher keeps it; held here too for the batcher's lifetime
        dispatcher = self._cluster.nodes_manager._event_dispatcher
        dispatcher.register_listeners({AsyncAfterSlotsCacheRefreshEvent: [self._listener]})

    def _check_failovers(self) -> None:
        cache = self._cluster.nodes_manager.slots_cache
        for slot, before in list(self._last_primary.items()):
            nodes = cache.get(slot)
            if before in self._lossy and nodes and nodes[0].name != before:
                self._fence(before, None)

    def _fence(self, lost: str, call: _Call | None) -> None:
        """Holds `call` until every slot that last went to the lost primary `lost` was handed to
        on_lost_writes."""
        if call is not None:
            self._fenced.append(call)
        if lost not in self._fences:
            self._fences[lost] = asyncio.create_task(self._run_fence(lost))

    async def _run_fence(self, lost: str) -> None:
        slots = sorted(slot for slot, name in self._last_primary.items() if name == lost)
        log.error(
            "primary %s failed over after its replica fell behind acknowledged writes (WAIT fell short): "
            "%d slots it served are taken out of service to be rebuilt from PostgreSQL",
            lost,
            len(slots),
        )
        try:
            if self.on_lost_writes is not None:
                await self.on_lost_writes(slots)
        except Exception:
            log.exception("taking the slots of %s out of service failed; their calls go on", lost)
        finally:
            for slot in slots:
                if self._last_primary.get(slot) == lost:
                    del self._last_primary[slot]
            self._lossy.discard(lost)
            del self._fences[lost]
            fenced, self._fenced = self._fenced, []
            for call in fenced:
                self._enqueue(call)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, node: ClusterNode, replicas: int, calls: list[_Call]) -> None:
        wait_for = min(self.wait_replicas, replicas)
        loop = asyncio.get_running_loop()
        replies = [loop.create_future() for _ in range(len(calls) + (1 if wait_for else 0))]
        try:
            payload = b"".join(pack_evalsha(c.sha, c.keys, c.args) for c in calls)
            if wait_for:
                payload += b"*3\r\n$4\r\nWAIT\r\n$%d\r\n%d\r\n$%d\r\n%d\r\n" % (
                    len(str(wait_for)),
                    wait_for,
                    len(str(self.wait_timeout_ms)),
                    self.wait_timeout_ms,
                )
            line = await self._open_line(node)
        except Exception as exc:
            self._answer(None, calls, [exc] * len(calls), wait_for, None)
            return
        self.waits_sent += 1 if wait_for else 0
        line.waiting.extend(replies)
        if line.reader is None:
            line.reader = asyncio.create_task(self._read(line))
        timeout = node.connection_kwargs.get("socket_timeout")
        if timeout:
            loop.call_later(timeout + self.wait_timeout_ms / 1000, self._check_answered, line, replies[-1])
        try:
            await line.conn.send_packed_command(payload, check_health=False)
        except Exception as exc:
            await self._break(line, exc)
        results = await asyncio.gather(*replies, return_exceptions=True)
        acked = results[-1] if wait_for else None
        self._answer(node, calls, results[: len(calls)], wait_for, acked)

    def _answer(
        self, node: ClusterNode | None, calls: list[_Call], results: Sequence[Any], wait_for: int, acked: Any
    ) -> None:
        if wait_for and isinstance(acked, int) and acked < wait_for:
            self.wait_shortfalls += 1
            if node is not None:
                self._lossy.add(node.name)
        elif wait_for and node is not None and isinstance(acked, int):
            # the replica caught up: WAIT counts the whole replication stream, earlier writes included
            self._lossy.discard(node.name)
            log.warning("WAIT: %d of %d replicas acknowledged within %d ms", acked, wait_for, self.wait_timeout_ms)
        for call, result in zip(calls, results, strict=True):
            if call.future.done():
                continue
            if isinstance(result, _REDIRECTS) and call.attempts < REDIRECT_ATTEMPTS:
                call.attempts += 1
                self._spawn(self._resend_after_reload(call))
            elif isinstance(result, BaseException):
                if isinstance(result, RedisConnectionError | RedisTimeoutError):
                    self._reload_slots()
                call.future.set_exception(result)
            else:
                call.future.set_result(result)

    async def _resend_after_reload(self, call: _Call) -> None:
        await self._reload_slots(wait=True)
        self._enqueue(call)

    def _reload_slots(self, wait: bool = False) -> Any:
        """Reloads the slot map (at most every REFRESH_GAP_S); with `wait`, returns an awaitable of it."""
        idle = self._refresh is None or self._refresh.done()
        if idle and time.monotonic() - self._refreshed_at >= REFRESH_GAP_S:
            self._refresh = asyncio.create_task(self._do_reload())
        if wait:
            return asyncio.shield(self._refresh) if self._refresh is not None else asyncio.sleep(REFRESH_GAP_S)
        return None

    async def _do_reload(self) -> None:
        self._refreshed_at = time.monotonic()
        self.slot_reloads += 1
        try:
            await self._cluster.nodes_manager.initialize()
        except Exception as exc:  # every node away for now: the next failure asks again
            log.warning("reloading the cluster's slot map failed: %r", exc)
            await asyncio.sleep(REFRESH_GAP_S)

    async def _open_line(self, node: ClusterNode) -> _Line:
        line = self._lines.get(node.name)
        if line is not None and line.node is node:
            return line
        async with self._opening:
            line = self._lines.get(node.name)
            if line is None or line.node is not node:
                conn = node.acquire_connection()
                try:
                    await conn.connect()  # type: ignore[no-untyped-call]  # before any write: concurrent first writes must not each connect
                except BaseException:
                    node.release(conn)
                    raise
                line = _Line(node, conn)
                self._lines[node.name] = line
            return line

    async def _read(self, line: _Line) -> None:
        try:
            while line.waiting and not line.closed:
                try:
                    reply: Any = await line.conn.read_response(timeout=math.inf)
                except ResponseError as exc:  # that call's answer, not the line's
                    reply = exc
                future = line.waiting.popleft()
                if future.done():
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except Exception as exc:
            await self._break(line, exc)
            return
        finally:
            line.reader = None
        if not line.closed:
            self._close(line)
            line.node.release(line.conn)

    def _check_answered(self, line: _Line, future: asyncio.Future[Any]) -> None:
        if not future.done() and not line.closed:
            self._spawn(self._break(line, RedisTimeoutError("a cluster node did not answer script calls in time")))

    async def _break(self, line: _Line, exc: Exception) -> None:
        if line.closed:
            return
        self._close(line)
        if not isinstance(exc, RedisConnectionError | RedisTimeoutError):
            exc = RedisConnectionError(f"script connection to {line.node.name} failed: {exc!r}")
        waiting, line.waiting = line.waiting, deque()
        for future in waiting:
            if not future.done():
                future.set_exception(exc)
        try:
            await line.conn.disconnect(nowait=True)
        finally:
            line.node.release(line.conn)

    def _close(self, line: _Line) -> None:
        line.closed = True
        if self._lines.get(line.node.name) is line:
            del self._lines[line.node.name]


# How often every process reloads the slot map even when nothing failed: it is how a client learns that a
# replica joined or died (WAIT asks for the replicas the map lists; CLUSTER SLOTS drops a failed one within
# the node timeout). One CLUSTER SLOTS per process per period.
SLOT_MAP_REFRESH_S = 2.0

# An idle cluster worker polls its streams this often: XREADGROUP BLOCK takes one slot's streams at a time,
# and blocking on each of a node's shards in turn would delay the others.
IDLE_POLL_S = 0.02


async def on_node_of(cluster: Redis, key: str, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Runs `commands` in order on one connection to the primary serving `key`'s slot; their raw replies.
    (One connection because WAIT only counts the writes of the connection it is sent on.)"""
    node = cast(RedisCluster, cluster).get_node_from_key(key)
    if node is None:
        raise RedisConnectionError(f"no node serves the slot of {key!r}")
    conn = node.acquire_connection()
    try:
        await conn.send_packed_command(conn.pack_commands(commands))
        return [await conn.read_response() for _ in commands]
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        node.release(conn)


async def read_group(
    redis: Redis,
    group: str,
    consumer: str,
    streams: dict[str, str],
    *,
    count: int,
    block_ms: int | None,
    wait_replicas: int = 0,
    wait_timeout_ms: int = 100,
) -> list[Any]:
    """XREADGROUP over many shards' streams, as redis-py answers it ([[stream, [(id, fields), ...]], ...]).

    One call on a single Redis. On a cluster each stream is its own slot, so each node gets its streams'
    reads on one connection, and with `wait_replicas` a WAIT after them: the entries handed out are then on
    the replica as well, so nothing persisted from them can vanish from Redis in a failover (the replica
    promoted would lack an event PostgreSQL already has). If the replica does not acknowledge in time,
    ReplicationLag is raised: the entries stay pending for the caller to read again (with id "0") once
    the replica caught up or the slot map no longer lists it. Blocking becomes a short idle poll."""
    if not is_cluster(redis):
        reply: Any = await redis.xreadgroup(group, consumer, streams, count=count, block=block_ms)  # type: ignore[arg-type]
        return list(reply or [])
    by_node: dict[str, list[str]] = {}
    rc = cast(RedisCluster, redis)
    for stream in streams:
        node = rc.get_node_from_key(stream)
        if node is None:
            raise RedisConnectionError(f"no node serves the slot of {stream!r}")
        by_node.setdefault(node.name, []).append(stream)

    async def node_reads(names: list[str]) -> list[Any]:
        commands: list[list[Any]] = [
            ["XREADGROUP", "GROUP", group, consumer, "COUNT", count, "STREAMS", name, streams[name]] for name in names
        ]
        slot = rc.keyslot(names[0])
        replicas = min(wait_replicas, max(0, len(rc.nodes_manager.slots_cache.get(slot, [])) - 1))
        if replicas:
            commands.append(["WAIT", replicas, wait_timeout_ms])
        replies = await on_node_of(redis, names[0], commands)
        if replicas and int(replies[-1]) < replicas:
            raise ReplicationLag(f"{replies[-1]} of {replicas} replicas of {names[0]}'s node acknowledged")
        # a reply is {stream: entries} or [[stream, entries]], as the connection's protocol has it
        return [
            r for reply in replies[: len(names)] if reply for r in (reply.items() if isinstance(reply, dict) else reply)
        ]

    per_node = await asyncio.gather(*(node_reads(names) for names in by_node.values()))
    result = [
        [stream, [(entry_id, dict(zip(f[::2], f[1::2], strict=True)) if f else {}) for entry_id, f in entries]]
        for replies in per_node
        for stream, entries in replies
    ]
    if block_ms and not any(entries for _, entries in result):
        await asyncio.sleep(min(block_ms / 1000, IDLE_POLL_S))
    return result


async def with_server_time(redis: Redis, key: str, command: Sequence[Any]) -> tuple[Any, tuple[int, int]]:
    """`command` (on `key`) and TIME read together: (its raw reply, (seconds, microseconds)). On a cluster both
    go to the node holding `key`, whose clock it is; a keyless TIME has no node to go to there."""
    if is_cluster(redis):
        reply, now = await on_node_of(redis, key, [command, ["TIME"]])
    else:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.execute_command(*command)
            pipe.time()
            reply, now = await pipe.execute()
    return reply, (int(now[0]), int(now[1]))
