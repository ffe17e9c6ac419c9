"""The bridge's exceptions.

    BridgeError
    ├── ConfigError            invalid or unreadable configuration (exit 2)
    ├── InvalidMessage         a payload we cannot accept (dead-lettered, never fatal)
    ├── RedisError             Redis unreachable or answered with an error
    │   └── RedisReplyError    Redis answered with an error reply (e.g. NOGROUP)
    ├── DeliveryError          a sink could not deliver an event
    │   ├── TransientDelivery  worth retrying (connection error, timeout, 408/425/429/5xx)
    │   └── PermanentDelivery  never retried: dead-lettered with status and body
    ├── MqttError              the broker refused us or the connection broke
    └── FencedError            an append under an MQTT session lease this replica lost (ha)

Foreign exceptions (httpx, paho, OSError) are translated at the boundary with
``raise ... from exc`` so callers only handle these types.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """Raised when the configuration file or environment is invalid.

    ``source`` is the file (or ``env``) and ``key`` the dotted path at fault.
    """

    def __init__(self, message: str, *, source: str = "", key: str = "") -> None:
        self.source = source
        self.key = key
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{message}")


class InvalidMessage(BridgeError):
    """Raised when an MQTT payload cannot be accepted; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str, *, topic: str = "") -> None:
        self.reason = reason
        self.detail = detail
        self.topic = topic
        super().__init__(f"{reason}: {detail}" + (f" (topic {topic})" if topic else ""))


class RedisError(BridgeError):
    """Raised when Redis cannot be reached or the connection broke mid-command."""


class RedisReplyError(RedisError):
    """Raised when Redis answers a command with an error reply."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class DeliveryError(BridgeError):
    """Raised by a sink that could not deliver an event."""

    def __init__(
        self,
        message: str,
        *,
        sink: str,
        status: int | None = None,
        body: str = "",
        retry_after: float | None = None,
        reason: str = "",
    ) -> None:
        self.sink = sink
        self.reason = reason or (f"{sink}_{status}" if status is not None else f"{sink}_error")
        self.status = status
        self.body = body
        self.retry_after = retry_after
        super().__init__(f"{sink}: {message}")


class TransientDelivery(DeliveryError):
    """Raised for failures that are retried with backoff, forever."""


class PermanentDelivery(DeliveryError):
    """Raised for rejections that must not be retried; the event is dead-lettered."""


class MqttError(BridgeError):
    """Raised when the broker cannot be reached, refuses us, or the connection breaks."""

    def __init__(self, message: str, *, rc: int | None = None) -> None:
        self.rc = rc
        super().__init__(message)


class FencedError(BridgeError):
    """Raised by an outbox append made under a session lease (``[ha]``) that this replica
    no longer holds: another replica adopted the MQTT session, or this one was frozen for
    longer than the lease. Nothing was appended; the messages stay unacknowledged and the
    broker hands them to the session's current holder."""
