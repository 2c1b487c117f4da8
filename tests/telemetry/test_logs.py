"""Log records as JSON lines or text, with the request id (app/telemetry/logs.py). Each case runs in a
child interpreter: configuring logging here would replace pytest's own handlers."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.processes import REPO

EMIT = """
import logging, sys
from app.telemetry.context import CURRENT, RequestContext
from app.telemetry.logs import configure_logging
configure_logging(sys.argv[1])
log = logging.getLogger("app.demo")
log.info("outside any request")
token = CURRENT.set(RequestContext("req-123"))
log.warning("inside %s", "a request", extra={"color_message": "ansi", "sku": "tea"})
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("uvicorn.error").exception("it broke")
CURRENT.reset(token)
"""


def emit(fmt: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", EMIT, fmt], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout == ""  # logs go to stderr
    return done.stderr.splitlines()


def test_json_format_is_one_object_a_line_with_the_request_id() -> None:
    lines = emit("json")
    records = [json.loads(line) for line in lines]  # a traceback stays inside its record's line

    assert len(records) == 3
    outside, inside, broke = records
    assert (outside["level"], outside["logger"], outside["message"], outside["request_id"]) == (
        "INFO",
        "app.demo",
        "outside any request",
        None,
    )
    assert (inside["message"], inside["request_id"], inside["sku"]) == ("inside a request", "req-123", "tea")
    assert "color_message" not in inside
    assert set(inside) >= {"timestamp", "pid"} and inside["timestamp"].endswith("+00:00")
    assert broke["logger"] == "uvicorn.error" and broke["request_id"] == "req-123"
    assert "ZeroDivisionError" in broke["exc_info"]


def test_text_format_is_for_people_and_keeps_the_request_id() -> None:
    lines = emit("text")
    assert lines[0].endswith("INFO app.demo [None]: outside any request")
    assert lines[1].endswith("WARNING app.demo [req-123]: inside a request")
    assert "Traceback" in "\n".join(lines[2:])
