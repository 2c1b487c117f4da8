"""The request being answered, as the logs and the metrics see it: its id and, for a reservation, how it
ended. One ContextVar holds it, set by the ASGI entry point (app/api/observe.py) for each HTTP request;
everything awaited while answering, the log records it emits included, reads the same object. Tasks
started outside a request (sweeper, worker, refreshes) see none.

A ContextVar rather than an argument threaded through every call: log records come from code that knows
nothing of requests (redis-py, asyncpg, uvicorn's access log, the domain)."""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from dataclasses import dataclass

HEADER = b"x-request-id"
# What an incoming X-Request-ID may be: the ids proxies and clients send (UUIDs, ULIDs, hex, base64 and
# dotted trace ids) fit; anything else (too long, spaces, quotes, control characters) is replaced, so an
# id is always safe to echo in a header and to search for in the logs.
MAX_LENGTH = 128
_VALID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,%d}" % MAX_LENGTH)


@dataclass(slots=True)
class RequestContext:
    request_id: str
    code: str | None = None  # the code of the last problem document built for this request
    outcome: str | None = None  # a reservation's outcome when it is not just its problem code


CURRENT: ContextVar[RequestContext | None] = ContextVar("stockhold_request", default=None)


def new_request_id() -> str:
    """96 random bits as 24 hex characters: no collision to fear over years of requests (os.urandom is
    one getrandom call, about 1 µs; the id needs no more than that, nor uuid's formatting)."""
    return os.urandom(12).hex()


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when there is exactly one and it is well formed, else a new one."""
    found: bytes | None = None
    for name, value in headers:
        if name == HEADER:
            if found is not None:
                return new_request_id()  # two ids for one request: trust neither
            found = value
    if found is not None and _VALID.fullmatch(found):
        return found.decode("ascii")
    return new_request_id()


def current_request_id() -> str | None:
    ctx = CURRENT.get()
    return ctx.request_id if ctx is not None else None


def note_code(code: str) -> None:
    """A problem document with this code is being answered (app/api/problems.py calls it)."""
    ctx = CURRENT.get()
    if ctx is not None:
        ctx.code = code


def note_outcome(outcome: str) -> None:
    """How a reservation ended, where its status and code do not say it (reserved, a replay, the
    sold-out fast path)."""
    ctx = CURRENT.get()
    if ctx is not None:
        ctx.outcome = outcome
