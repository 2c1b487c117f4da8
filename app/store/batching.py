"""Coalesces the script calls of concurrent requests into one pipeline per event-loop tick, on one
connection kept for the purpose.

Under a flash sale hundreds of requests in one process each want one EVALSHA at the same moment. Sent
one by one, every call pays a pool checkout, a socket write, a wakeup on its reply and redis-py's
per-command bookkeeping; that CPU, not Redis, bounded the service (issue 4). Queued instead, every call
made during one pass of the event loop leaves in one write, and a reader resolves the replies in order as
they arrive; writes of later ticks do not wait for earlier replies (Redis answers one connection's
commands in the order they came). Nothing about a call changes but when its bytes leave: each script
still runs alone and atomically in Redis, and one caller's calls still run in the order it awaited them.

A call's reply or error goes back to its own caller only: a refused script does not fail its neighbours.
A lost connection, or one that answers nothing for the socket timeout, fails the calls waiting on it (as
it would have failed them one by one). The connection is borrowed from the client's pool while calls
are waiting on it, so a sustained burst keeps one, and given back when the last reply is in: the pool
checks it before lending it again (a Redis restarted meanwhile costs no request).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Bounds one pipeline's size; a larger burst leaves in several pipelines of this many calls each.
MAX_BATCH = 256


def pack_evalsha(sha: str, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
    """One EVALSHA in RESP. Arguments are str, bytes, int or float (what Scripts.call takes); redis-py's general
    packer spends several times as long per argument, which at ten thousand calls a second shows."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (3 + len(keys) + len(args), sha.encode())]
    count = str(len(keys)).encode()
    parts.append(b"$%d\r\n%s\r\n" % (len(count), count))
    for value in (*keys, *args):
        if isinstance(value, str):
            data = value.encode()
        elif isinstance(value, bytes):
            data = value
        elif isinstance(value, int) and not isinstance(value, bool):
            data = b"%d" % value
        elif isinstance(value, float):
            data = repr(value).encode()  # as redis-py encodes floats
        else:
            raise TypeError(f"script arguments are str, bytes, int or float, not {type(value).__name__}")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Line:
    """A connection the batcher writes on while calls await its replies (oldest first)."""

    __slots__ = ("closed", "conn", "reader", "waiting")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.reader: asyncio.Task[None] | None = None
        self.closed = False


class ScriptBatcher:
    def __init__(self, redis: Redis, max_batch: int = MAX_BATCH) -> None:
        self._pool = redis.connection_pool
        self._timeout: float | None = redis.connection_pool.connection_kwargs.get("socket_timeout") or None
        self._max_batch = max_batch
        self._queue: list[tuple[str, Sequence[Any], Sequence[Any], asyncio.Future[Any]]] = []
        self._line: _Line | None = None
        self._opening = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until each is done

    def call(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """EVALSHA ``sha``; the future gets its reply, or the ResponseError (NoScriptError included) or
        connection error it met."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            # after every callback already ready in this pass: the other requests of the tick join in
            loop.call_soon(self._flush)
        self._queue.append((sha, keys, args, future))
        return future

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), self._max_batch):
            self._spawn(self._write(queue[start : start + self._max_batch]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, batch: list[tuple[str, Sequence[Any], Sequence[Any], asyncio.Future[Any]]]) -> None:
        futures = [future for _, _, _, future in batch]
        try:
            payload = b"".join(pack_evalsha(sha, keys, args) for sha, keys, args, _ in batch)
            line = await self._open_line()
        except Exception as exc:
            _fail(futures, exc)
            return
        # From here to the socket write nothing awaits, so replies are expected in the order written.
        line.waiting.extend(futures)
        if line.reader is None:
            line.reader = asyncio.create_task(self._read(line))
        if self._timeout is not None:
            asyncio.get_running_loop().call_later(self._timeout, self._check_answered, line, futures[-1])
        try:
            await line.conn.send_packed_command(payload, check_health=False)
        except Exception as exc:
            await self._break(line, exc)

    async def _open_line(self) -> _Line:
        if self._line is not None:
            return self._line
        async with self._opening:
            if self._line is None:
                self._line = _Line(await self._pool.get_connection())  # type: ignore[no-untyped-call]
            return self._line

    async def _read(self, line: _Line) -> None:
        """Resolves the line's waiting calls in order; when none waits, gives the connection back."""
        try:
            while line.waiting and not line.closed:
                try:
                    reply: Any = await line.conn.read_response(timeout=math.inf)
                except ResponseError as exc:  # a script's error reply: that call's answer, not the line's
                    reply = exc
                future = line.waiting.popleft()
                if future.done():  # the caller went away; the script ran all the same
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
            await self._pool.release(line.conn)

    def _check_answered(self, line: _Line, future: asyncio.Future[Any]) -> None:
        if not future.done() and not line.closed:
            stalled = RedisTimeoutError(f"Redis did not answer script calls within {self._timeout}s")
            self._spawn(self._break(line, stalled))

    async def _break(self, line: _Line, exc: Exception) -> None:
        """Fails every call waiting on the line and gives its connection back, closed."""
        if line.closed:
            return
        self._close(line)
        if not isinstance(exc, RedisConnectionError | RedisTimeoutError):
            exc = RedisConnectionError(f"script connection failed: {exc!r}")
        _fail(list(line.waiting), exc)
        line.waiting.clear()
        await line.conn.disconnect(nowait=True)
        await self._pool.release(line.conn)

    def _close(self, line: _Line) -> None:
        """From here on no write goes to this line (the next one borrows a connection again)."""
        line.closed = True
        if self._line is line:
            self._line = None


def _fail(futures: Sequence[asyncio.Future[Any]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
