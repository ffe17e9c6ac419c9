"""Logging set-up: one line per record, text or JSON. Configured once, by the CLI."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Final

import msgspec

from .redact import escape

_encoder: Final = msgspec.json.Encoder()
MESSAGE_LIMIT: Final = 20000  # characters of one log message
_STD: Final = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(out).decode()


class TextFormatter(logging.Formatter):
    """One record, one line: control characters in the message are escaped, so text from
    outside that slipped through unescaped still cannot forge a line (tracebacks, added
    after the message, keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - stdlib name
        record.message = escape(record.message, limit=MESSAGE_LIMIT)
        return super().formatMessage(record)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "hypercorn.access", "hypercorn.error", "trio-websocket"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
