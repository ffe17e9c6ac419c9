"""Logging set-up: one line per record, text or JSON. Configured once, by the CLI."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
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


# sd-daemon(3) priorities: journald reads a "<N>" prefix as the line's priority
_PRIORITY: Final = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(TextFormatter):
    """Text lines with a ``<N>`` priority prefix (``journalctl -p warning`` works) and
    no timestamp of their own: the journal stamps every line."""

    def __init__(self) -> None:
        super().__init__("%(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 3 if record.levelno > logging.WARNING else 6)
        text = super().format(record)
        # a multi-line record (a traceback) keeps its priority on every line
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def on_journal(env: Mapping[str, str] = os.environ, stream: Any = None) -> bool:
    """True when stderr is the journal's stream (``JOURNAL_STREAM`` names its device and
    inode, as systemd sets it), not a file or pipe it was redirected to."""
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif on_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "hypercorn.access", "hypercorn.error", "trio-websocket"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
