"""The reserve hot path's own cost, in process: POST /v1/reservations through the app's ASGI entry, no
HTTP server, no network client, one request at a time, for two source trees side by side (issue 7 part
5 measured what request ids and metrics add with it).

    .venv/bin/python bench/reserve_inprocess.py                 # this tree against `main`
    .venv/bin/python bench/reserve_inprocess.py --before REV    # against another revision

Each round runs one child interpreter per tree, alternately, against the same embedded servers (or
REDIS_URL / DATABASE_URL, whose stock state is then changed): it builds the app (worker, webhooks and
key checks off, so the loop measures the request alone), reserves one unit N times on a fresh SKU and
prints the process CPU time and the wall time per reservation. The CPU figure is the one to compare:
Redis runs in another process, and wall time also counts waiting for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]


async def child(n: int) -> dict[str, Any]:
    import orjson

    import app
    from app.config import Settings
    from app.main import create_app

    settings = Settings(
        STOCKHOLD_SHARDS=16,
        STOCKHOLD_REQUIRE_AUTH=False,
        STOCKHOLD_WORKER_IN_PROCESS=False,
        STOCKHOLD_WEBHOOKS=False,
    )
    application = create_app(settings)
    sku = f"bench-{os.getpid()}"

    async def call(method: str, path: str, body: bytes, entry: Any = application) -> int:
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "scheme": "http",
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000),
            "headers": [(b"host", b"bench"), (b"content-type", b"application/json")],
            "app": application,
        }
        await entry(scope, receive, send)
        return status

    async with application.router.lifespan_context(application):
        assert await call("PUT", f"/v1/skus/{sku}", orjson.dumps({"on_hand": 10 * n})) in (200, 201)
        bodies = [orjson.dumps({"user_id": f"u{i}", "items": [{"sku": sku, "quantity": 1}]}) for i in range(n + 200)]
        for body in bodies[:200]:  # warm up: caches, the script's first calls
            assert await call("POST", "/v1/reservations", body) == 201
        cpu, wall = time.process_time(), time.perf_counter()
        for body in bodies[200:]:
            assert await call("POST", "/v1/reservations", body) == 201
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        result = {"cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6, "source": str(Path(app.__file__).parents[1])}
        # A tree whose app has an observing layer (app/api/observe.py) in front of `_serve`: its cost, paired
        # in this one process, blocks of 100 with it and without it alternating, so the machine's noise
        # (other processes, frequency) falls on both alike.
        bypass = getattr(application, "_serve", None)
        if bypass is not None:
            more = [orjson.dumps({"user_id": f"v{i}", "items": [{"sku": sku, "quantity": 1}]}) for i in range(n)]
            spent = {"with": 0.0, "without": 0.0}
            for start in range(0, n, 100):
                entry, name = (application, "with") if start // 100 % 2 == 0 else (bypass, "without")
                t = time.process_time()
                for body in more[start : start + 100]:
                    assert await call("POST", "/v1/reservations", body, entry) == 201
                spent[name] += time.process_time() - t
            half = n / 2
            result["observe_us"] = (spent["with"] - spent["without"]) / half * 1e6
    return result


def export(rev: str, into: Path) -> Path:
    """The tree of ``rev`` (git archive), to import its `app` package from."""
    archive = into / f"{rev.replace('/', '_')}.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), rev], cwd=HERE, check=True)
    tree = into / rev.replace("/", "_")
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="main")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", type=int, default=3000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, args.child)
        print(json.dumps(asyncio.run(child(args.n))))
        return

    sys.path.insert(0, str(HERE))
    from bench.servers import workspace

    with ExitStack() as stack:
        ws = workspace(stack)
        trees = {f"before ({args.before})": export(args.before, Path(tempfile.mkdtemp(dir=ws.work))), "after": HERE}
        env = {**os.environ, "REDIS_URL": ws.redis_url, "DATABASE_URL": ws.database_url}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, tree in trees.items():
                cmd = [sys.executable, __file__, "--child", str(tree), "-n", str(args.n)]
                out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.splitlines()[-1])
                assert Path(result.pop("source")) == tree, "the child imported another tree's app"
                results[name].append(result)
                paired = f", observe layer {result['observe_us']:+.1f} us CPU" if "observe_us" in result else ""
                print(f"round {r + 1} {name}: {result['cpu_us']:.1f} us CPU, {result['wall_us']:.1f} us wall{paired}")
        print(f"\nmedians over {args.rounds} rounds of {args.n} reservations:")
        for name, rows in results.items():
            cpu = statistics.median(row["cpu_us"] for row in rows)
            wall = statistics.median(row["wall_us"] for row in rows)
            print(f"  {name:<16} {cpu:7.1f} us CPU  {wall:7.1f} us wall per reservation")
        first, second = (statistics.median(row["cpu_us"] for row in rows) for rows in results.values())
        print(f"  CPU difference: {second - first:+.1f} us ({(second / first - 1) * 100:+.1f}%)")
        paired_us = [row["observe_us"] for rows in results.values() for row in rows if "observe_us" in row]
        if paired_us:
            print(f"  observe layer, paired in process: median {statistics.median(paired_us):+.1f} us CPU")


if __name__ == "__main__":
    main()
