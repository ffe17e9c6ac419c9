"""What both implementations of a durable stream share: the items they hand out, the
receipts they give, the session fence, and the one interface (:class:`Stream`).

- :mod:`.redis_stream`: the Redis stream (consumer groups, read-through hand-over,
  batched acks, reclaim, trim);
- :mod:`.memory_stream`: the bounded in-memory fallback while Redis is away;
- :mod:`.streams`: :class:`~.streams.DurableStream`, the switch-over between them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import trio


class Origin(enum.Enum):
    """Where an item handed to a reader lives (and so where its ack goes)."""

    REDIS = "redis"
    MEMORY = "memory"


@dataclass(slots=True)
class Item:
    id: str  # the stream entry id, or the memory implementation's own sequence number
    data: bytes
    origin: Origin = Origin.REDIS


class Receipt:
    """Tells when an appended item is safe to acknowledge upstream."""

    __slots__ = ("_event",)

    def __init__(self, event: trio.Event | None) -> None:
        self._event = event

    @property
    def safe(self) -> bool:
        return self._event is None or self._event.is_set()

    async def wait(self) -> None:
        if self._event is not None:
            await self._event.wait()


SAFE: Final = Receipt(None)


class Fence(Protocol):
    """An MQTT session lease (ha.py): appends under it succeed only while Redis holds
    ``token`` at ``key``; ``valid()`` is the local check used without Redis."""

    @property
    def key(self) -> str: ...

    @property
    def token(self) -> str: ...

    def valid(self) -> bool: ...

    def refused(self) -> None:
        """Told when messages were dropped unacknowledged because of this fence."""


class Stream(Protocol):
    """One implementation of a durable stream: ordered items, one consumer group per
    reader, each group reading and acknowledging on its own."""

    @property
    def key(self) -> str: ...

    def take(self, group: str, count: int) -> list[Item]:
        """Up to ``count`` items ready for ``group`` now, without waiting."""
        ...

    async def read(self, group: str, count: int, block_ms: int) -> list[Item]:
        """Wait (about ``block_ms`` at most) for items for ``group``; [] when none came."""
        ...

    async def ack(self, group: str, ids: Sequence[str]) -> None:
        """``group`` finished these items."""
        ...

    def release(self, group: str) -> int:
        """Hand out again what ``group`` was handed and did not acknowledge (its consumer
        restarted). Returns how many."""
        ...

    def inflight(self, group: str) -> int:
        """Items handed to ``group`` and not acknowledged yet."""
        ...

    async def depth(self, group: str) -> int:
        """Items ``group`` has not finished (undelivered and in flight)."""
        ...

    def wake(self) -> None:
        """Readers waiting in ``read`` look again now."""
        ...
