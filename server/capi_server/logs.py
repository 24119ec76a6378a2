"""Structured logging: the seed's lines as records with fields, text or JSON.

Every record carries the request id and caller of the RPC it belongs to (contextvars set
by the RPC guard), so one RPC's records can be tied together.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
caller_var: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra=` fields of a record."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if not hasattr(record, "caller"):
            record.caller = caller_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(record_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = {k: v for k, v in record_fields(record).items() if v not in ("", None)}
        if fields:
            base += " " + json.dumps(fields, default=str, ensure_ascii=False)
        return base


def configure_logging(log_format: str = "text", level: str = "INFO") -> None:
    # Neither formatter prints the caller's file and line, thread or process: not looked up
    # for every record (a stack walk on the serving path).
    logging._srcfile = None  # the switch the logging docs give for this
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party request logs would print URLs; ours say what matters.
    for noisy in (
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "openai",
        "aiosqlite",
        "alembic.runtime",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
