"""Refuses oversized and non-JSON request bodies before any parsing (pure ASGI, so the body is read
at most once): 413 ``payload_too_large`` past STOCKHOLD_MAX_BODY_BYTES, 415 ``unsupported_media_type``
when a non-empty body is not JSON. Bodiless POSTs (confirm, release) pass with any content type.

``read_guarded_body`` is the check itself; the middleware applies it to every request FastAPI serves,
and the reserve hot path (app/api/hot_path.py), which runs in front of FastAPI, applies it too."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import problem

_WITH_BODY = {"POST", "PUT", "PATCH"}


async def read_guarded_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes | Response | None:
    """The request's whole body; or the refusal to send instead; or None when the client went away."""
    path = scope["path"]
    length = None
    content_type = b""
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value
        elif name == b"content-type":
            content_type = value
    if length is not None and length.isdigit() and int(length) > max_bytes:
        return _too_large(max_bytes, path)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            return _too_large(max_bytes, path)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks) if len(chunks) != 1 else chunks[0]
    media_type = content_type.split(b";")[0].strip().lower()
    if body and not (media_type == b"application/json" or media_type.endswith(b"+json")):
        return problem(
            415,
            "unsupported_media_type",
            "Unsupported media type",
            f"send the body as application/json (got {media_type.decode(errors='replace') or 'none'})",
            path,
        )
    return body


def replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the already-read body over once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyGuard:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        body = await read_guarded_body(scope, receive, self.max_bytes)
        if body is None:
            return
        if isinstance(body, Response):
            await body(scope, receive, send)
            return
        await self.app(scope, replaying(body, receive), send)


def _too_large(max_bytes: int, path: str) -> Response:
    detail = f"request bodies are limited to {max_bytes} bytes"
    return problem(413, "payload_too_large", "Payload too large", detail, path)
