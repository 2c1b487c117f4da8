"""A webhook receiver for tests: a tiny HTTP/1.1 server on 127.0.0.1 (ephemeral port) in the test's own
event loop, doing what the README tells receivers to do: verify the signature, then dedupe on
Webhook-Id. It can answer 500 to the first attempts of each event, or hold answers until released."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.webhooks.signing import verify


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived
    verified: bool
    status: int = 0  # what the receiver answered (0: no answer, e.g. held when the sender died)

    @property
    def event_id(self) -> str:
        return self.headers.get("webhook-id", "")

    def json(self) -> dict[str, Any]:
        return dict(orjson.loads(self.body))


@dataclass
class Receiver:
    secrets: dict[str, str] = field(default_factory=dict)  # path -> the endpoint's signing secret
    fail_first: int = 0  # answer 500 to this many attempts of each event id before a 2xx
    hold: asyncio.Event | None = None  # when set to an unset Event: requests wait for it before answered
    slow_first_s: float = 0  # process an event's first attempt, then answer this late (past the sender's timeout)
    requests: list[Request] = field(default_factory=list)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)  # event id -> body, first time processed
    duplicates: int = 0  # verified requests for an event id already processed
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set at every request
    port: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def attempts_of(self, event_id: str) -> list[Request]:
        return [r for r in self.requests if r.event_id == event_id]

    async def wait_for(self, predicate: Any, timeout_s: float) -> None:
        """Waits (bounded) until predicate() is true, re-checking on every request."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            left = deadline - time.monotonic()
            assert left > 0, f"receiver: not seen within {timeout_s} s; got {len(self.requests)} requests"
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), timeout=min(left, 0.5))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = await self._answer(path, headers, body)
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        secret = self.secrets.get(path, "")
        ok = verify(
            secret, headers.get("webhook-timestamp", ""), body, headers.get("webhook-signature", ""), time.time()
        )
        request = Request(path, headers, body, time.time(), ok)
        self.requests.append(request)
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        if not ok:
            request.status = 401
        elif len(self.attempts_of(request.event_id)) <= self.fail_first:
            request.status = 500
        elif request.event_id in self.events:
            self.duplicates += 1  # already processed: acknowledge, do nothing
            request.status = 200
        else:
            self.events[request.event_id] = request.json()
            request.status = 200
            if self.slow_first_s and len(self.attempts_of(request.event_id)) == 1:
                await asyncio.sleep(self.slow_first_s)  # its 2xx comes too late: the sender will retry
        return request.status


@contextlib.asynccontextmanager
async def running(receiver: Receiver) -> AsyncIterator[Receiver]:
    server = await asyncio.start_server(receiver._handle, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    try:
        yield receiver
    finally:
        server.close()
        if receiver.hold is not None:
            receiver.hold.set()
        for writer in list(receiver.writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=5)
