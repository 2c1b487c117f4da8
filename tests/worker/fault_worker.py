"""A `stockhold worker` that freezes at one point of its first batch, for tests to SIGKILL it there.

Run as ``python -m tests.worker.fault_worker --point after-commit --marker PATH [--name N --batch N]``
with REDIS_URL / DATABASE_URL / STOCKHOLD_SHARDS in the environment. It builds the real WriteBehindWorker
from the same stores `stockhold worker` uses and runs its real loop; only the PostgreSQL pool it is given
is wrapped, so that the first batch's transaction stops:

- ``after-commit``: the transaction committed, XACK not sent yet;
- ``before-commit``: persist_events ran inside the open transaction, COMMIT not sent yet.

At that point it writes PATH (JSON: pid, point) and sleeps, never reaching the next statement; the test
kills it. Should the test never do so, it exits on its own after HANG_S.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from app.cli import _stores
from app.worker.consumer import WriteBehindWorker

POINTS = ("after-commit", "before-commit")
HANG_S = 120.0


class _Fault:
    def __init__(self, point: str, marker: Path) -> None:
        self.point = point
        self.marker = marker
        self.fired = False

    def due(self, point: str) -> bool:
        return not self.fired and self.point == point

    async def freeze(self) -> None:
        self.fired = True
        partial = self.marker.with_suffix(".partial")
        partial.write_bytes(orjson.dumps({"pid": os.getpid(), "point": self.point}))
        partial.rename(self.marker)  # the test never reads a half-written marker
        await asyncio.sleep(HANG_S)
        os._exit(70)  # nobody killed us: stop without committing, acknowledging or cleaning up anything


class _Transaction:
    def __init__(self, inner: Any, fault: _Fault) -> None:
        self._inner = inner
        self._fault = fault

    async def __aenter__(self) -> _Transaction:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if kind is None and self._fault.due("before-commit"):
            await self._fault.freeze()
        result: bool | None = await self._inner.__aexit__(kind, exc, tb)  # COMMIT (or ROLLBACK on error)
        if kind is None and self._fault.due("after-commit"):
            await self._fault.freeze()
        return result


class _Connection:
    def __init__(self, inner: Any, fault: _Fault) -> None:
        self._inner = inner
        self._fault = fault

    def transaction(self, **kw: Any) -> _Transaction:
        return _Transaction(self._inner.transaction(**kw), self._fault)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Acquire:
    def __init__(self, inner: Any, fault: _Fault) -> None:
        self._inner = inner
        self._fault = fault

    async def __aenter__(self) -> _Connection:
        return _Connection(await self._inner.__aenter__(), self._fault)

    async def __aexit__(self, *exc: Any) -> None:
        await self._inner.__aexit__(*exc)


class _Pool:
    def __init__(self, inner: Any, fault: _Fault) -> None:
        self._inner = inner
        self._fault = fault

    def acquire(self, **kw: Any) -> _Acquire:
        return _Acquire(self._inner.acquire(**kw), self._fault)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def main(args: argparse.Namespace) -> None:
    fault = _Fault(args.point, Path(args.marker))
    async with _stores() as s:  # what `stockhold worker` runs on: the env's servers, migrated
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        pool: Any = _Pool(s.pg, fault)
        worker = WriteBehindWorker(s.redis, pool, s.keys, args.name, batch=args.batch, claim_idle_ms=args.claim_idle_ms)
        print(f"fault worker {args.name} running, freezing {args.point}", flush=True)
        await worker.run(stop)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--point", choices=POINTS, required=True)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--name", default="faulty")
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--claim-idle-ms", type=int, default=30_000)
    asyncio.run(main(parser.parse_args()))
