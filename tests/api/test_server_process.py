"""The real thing: `stockhold serve` with two API worker processes over TCP, 2,000 buyers, one bottle.

Two workers means two processes racing on the same Redis, each with its own sweeper, the way several
replicas would. The server is started and stopped by this test (by its own PID), on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx


async def test_two_workers_2000_buyers_one_bottle(server: str) -> None:
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=server, limits=limits, timeout=30) as http:
        assert (await http.put("/v1/skus/last-bottle", json={"on_hand": 1})).status_code == 201

        async def buy(i: int) -> tuple[int, str]:
            r = await http.post(
                "/v1/reservations", json={"user_id": f"u{i}", "items": [{"sku": "last-bottle", "quantity": 1}]}
            )
            return r.status_code, r.json().get("code") or r.json()["status"]

        outcomes = Counter(await asyncio.gather(*(buy(i) for i in range(2000))))
        state = (await http.get("/v1/skus/last-bottle")).json()

    assert outcomes == {(201, "held"): 1, (409, "insufficient_stock"): 1999}
    assert (state["held"], state["sold"], state["available"]) == (1, 0, 0)


async def test_an_idle_connection_outlasts_the_clients_pool_so_a_reused_one_is_never_reset(server: str) -> None:
    # httpx, like most client pools, drops a connection idle for 5 s. A server that closes at the same 5 s
    # (uvicorn's default) races the client: a request sent as the server closes gets a reset, not an answer.
    host, port = server.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def healthz() -> bytes:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        await reader.readexactly(int(length.split(b":")[1]))
        return head

    try:
        assert (await healthz()).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(6)  # idle for longer than the client's pool keeps it
        assert (await healthz()).startswith(b"HTTP/1.1 200"), "the server closed a connection idle for 6 s"
    finally:
        writer.close()
