"""Sinks: consumers of the outbox (backend HTTP, WhatsApp).

The outbox (``queues/``) hands entries to a sink through the Delivery contract
of docs/INTERNALS.md. These Protocols describe it structurally, so a sink does
not depend on which queue implementation (Redis stream or memory) is behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from ..messages import Event


class EntryLike(Protocol):
    """An outbox entry: ``queues.Entry(id, event)`` satisfies this."""

    @property
    def id(self) -> str: ...

    @property
    def event(self) -> Event: ...


E = TypeVar("E", bound=EntryLike)


class Delivery(Protocol[E]):
    """What a sink reads from and acknowledges to (one consumer group of the outbox)."""

    async def read(self, count: int) -> list[E]:
        """Block until at least one entry is there; return at most ``count``."""
        ...

    async def ack(self, entries: Sequence[E], outcome: str = "ok") -> None:
        """Acknowledge delivered entries; ``outcome`` is ``ok`` or ``skipped``."""
        ...

    async def dead_letter(self, entry: E, reason: str, detail: str) -> None:
        """Store the entry in the dead stream and acknowledge it (outcome failed)."""
        ...


class DeliveryObserver(Protocol):
    """Told what happened to each WhatsApp message, per recipient (receipts, timeline).

    ``event_ids`` are the outbox events the message carried; ``message_id`` is the
    provider's id for the sent message (None when the provider gives none).
    Called synchronously on the sink's path: implementations must not block.
    """

    def sent(self, number: str, message_id: str | None, event_ids: Sequence[str]) -> None: ...

    def failed(self, number: str, event_ids: Sequence[str], reason: str) -> None: ...


__all__ = ["Delivery", "DeliveryObserver", "E", "EntryLike"]
