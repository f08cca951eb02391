"""Logging: JSON lines (or plain text) on stderr, each carrying the current request's id.

`configure_logging` is called by the process that serves (`app_from_environment`), never by
`create_app`, so tests and embedding applications keep their own logging set-up.
"""

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["json", "text"]

# Set by the request middleware; copied into worker threads with the rest of the context, so
# engine code logging from `anyio.to_thread` carries the id too.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# LogRecord attributes that are the record's own, not `extra=` fields.
_RESERVED = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName", "color_message"}  # uvicorn's ANSI-coloured copy
)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id, `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with ` request_id=...` appended inside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = request_id_var.get()
        return line if request_id is None else f"{line} request_id={request_id}"


def configure_logging(
    level: str = "info", log_format: LogFormat = "json", stream: TextIO | None = None
) -> logging.Handler:
    """Make the root logger write `log_format` lines to `stream` (stderr) at `level`.

    uvicorn's own loggers are routed through the root logger so every line has one format;
    its access log is turned off, since the request middleware writes one line per request.
    Returns the handler installed.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
    access.disabled = True
    return handler
