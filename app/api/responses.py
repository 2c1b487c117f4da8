"""Response helpers shared by the routes."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel

from app.api.problems import PROBLEM_JSON


def json_response(model: BaseModel, status: int = 200) -> Response:
    # to_json gives the bytes model_dump_json would decode to str (and Response encode back)
    return Response(model.__pydantic_serializer__.to_json(model), status_code=status, media_type="application/json")


def stored_response(status: int, body: bytes) -> Response:
    return Response(body, status_code=status, media_type=PROBLEM_JSON if status >= 400 else "application/json")


def problem_schema(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            PROBLEM_JSON: {
                "schema": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail", "code"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "code": {"type": "string"},
                        "instance": {"type": "string"},
                    },
                }
            }
        },
    }


# Every /v1 route's answers to a request whose key is missing or refused, or lacks the scope.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem_schema("unauthenticated: no API key, or a malformed, unknown or revoked one"),
    403: problem_schema("forbidden: the key's scope does not allow this call"),
}
