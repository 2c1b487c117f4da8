"""The cheapest possible ASGI app: `make bench` serves it like stockhold (uvicorn, 2 workers) to measure
what the HTTP client and this machine allow at all, the baseline stockhold's HTTP rate is read against."""

from __future__ import annotations

from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})
