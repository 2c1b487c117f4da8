"""Log records as one JSON object a line (or text, STOCKHOLD_LOG_FORMAT=text), each carrying the id of
the request it was emitted for.

python-json-logger over structlog: it is a stdlib ``logging.Formatter``, so every record already emitted
through ``logging`` (ours, uvicorn's error and access logs, redis-py's, asyncpg's) comes out as JSON with
no call site changed, and its orjson variant reuses a dependency we have. structlog's strength is a new
logging API with bound loggers; adopting it here would mean bridging the stdlib records anyway.

`stockhold serve` hands the same configuration to uvicorn (``log_config``), which applies it in every
worker process it starts; before, a worker process had no handler of ours and dropped INFO records.
Apps built in process (the test suite) configure nothing, so pytest's output stays as pytest makes it.
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any, Literal

from app.telemetry.context import current_request_id

LogFormat = Literal["json", "text"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
# record attribute -> JSON key; every record also has "timestamp" (ISO 8601, UTC) and "request_id"
JSON_FIELDS = {"levelname": "level", "name": "logger", "process": "pid", "message": "message"}
# extras that only repeat the message: uvicorn attaches an ANSI-coloured copy of some messages
DROPPED_EXTRAS = ("color_message",)


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being answered on each record (None outside a request: the sweeper,
    the worker, start-up). A filter on the handler, so records of every logger get it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        return True


def logging_config(fmt: LogFormat, level: str = "INFO") -> dict[str, Any]:
    """A logging.config.dictConfig for the root logger and uvicorn's, which propagate to it."""
    if fmt == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS

        formatter: dict[str, Any] = {
            "()": "pythonjsonlogger.orjson.OrjsonFormatter",
            "fmt": list(JSON_FIELDS),
            "rename_fields": {k: v for k, v in JSON_FIELDS.items() if k != v},
            "timestamp": True,
            "reserved_attrs": [*RESERVED_ATTRS, *DROPPED_EXTRAS],
        }
    else:
        formatter = {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"stockhold": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "stockhold",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            name: {"handlers": [], "level": level, "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def configure_logging(fmt: LogFormat, level: str = "INFO") -> dict[str, Any]:
    """Applies the configuration to this process and returns it (for uvicorn's workers)."""
    config = logging_config(fmt, level)
    logging.config.dictConfig(config)
    return config
