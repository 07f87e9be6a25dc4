"""Logging set-up: JSON lines with the service name and the request id of the current request.

The gateway makes a request id (or takes the client's `X-Request-Id`), puts it in the
`x-request-id` gRPC metadata of every downstream call, and each service binds it with
`request_id_var` so that every log line of that request carries it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

REQUEST_ID_HEADER = "x-request-id"

request_id_var: ContextVar[str | None] = ContextVar("modalmesh_request_id", default=None)


@contextlib.contextmanager
def bound_request_id(request_id: str | None) -> Iterator[None]:
    """Bind `request_id` to every log line written inside the block."""
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


def request_id_from_metadata(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The x-request-id value of gRPC invocation metadata, if present."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, service, logger, msg, request_id, exc."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal, with the request id when there is one."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)s " + service + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = request_id_var.get()
        return f"{line} [req={request_id}]" if request_id else line


def setup_logging(service: str, *, level: str = "INFO", json_lines: bool = True) -> None:
    """Send the root logger to stderr in the chosen format; call once in a service's main."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if json_lines else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
