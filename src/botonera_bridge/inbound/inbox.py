"""The inbound WhatsApp queue and its per-sender lanes.

Messages from the gateway's WebSocket and from the Cloud API webhook are appended
to one inbox stream (Redis, or memory while it is away), de-duplicated by message
id, and handled in order per sender; different senders proceed in parallel.

Each entry is handled in isolation: one that cannot be decoded is logged, counted
(``botonera_rejected_total{source="inbox"}``) and dead-lettered before it is
acknowledged; a command that fails is logged (message id masked: WAHA ids embed
the sender's number) and counted, and the lane goes on. The lanes are
:class:`~botonera_bridge.lanes.Lanes`: at most :data:`MAX_PENDING` entries are held
at once, past that reading pauses and the rest waits in the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import msgspec
import trio

from ..ids import mask_phone, message_ref
from ..lanes import Lanes, LaneStatistics
from ..metrics import Metrics
from ..queues.outbox import DeadLetters
from ..queues.streams import DurableStream
from .ws_receiver import Inbound

log = logging.getLogger(__name__)

GROUP: Final = "workers"
READ_BATCH: Final = 100
MAX_PENDING: Final = 1000  # entries held in lanes; past it reading pauses
SOURCE: Final = "inbox"
_decoder: Final = msgspec.msgpack.Decoder(Inbound)
_encoder: Final = msgspec.msgpack.Encoder()

Handler = Callable[[Inbound], Awaitable[None]]


class Inbox:
    def __init__(
        self, stream: DurableStream, *, dead: DeadLetters, metrics: Metrics | None = None
    ) -> None:
        self.stream = stream
        self._dead = dead
        self._metrics = metrics
        self._lanes: Lanes[str, tuple[str, Inbound]] | None = None  # one per run

    async def append(self, msg: Inbound) -> None:
        """Queue one inbound message; a repeat of a message id is dropped by the stream."""
        # WhatsApp message ids are unique: any repeat is the gateway (or Meta) re-sending it.
        (receipt,) = await self.stream.append([(_encoder.encode(msg), f"?{msg.id}")])
        del receipt  # inbound messages are not acknowledged upstream

    @property
    def pending(self) -> int:
        """Entries held in the lanes: queued or being handled."""
        return self._lanes.pending if self._lanes is not None else 0

    def lane_statistics(self) -> LaneStatistics | None:
        """The running lanes' statistics (for gauges); None before the first run."""
        return self._lanes.statistics() if self._lanes is not None else None

    async def run(
        self, handle: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read the inbox forever and run ``handle`` per message, in order per sender."""
        lanes: Lanes[str, tuple[str, Inbound]] = Lanes(
            partial(self._one, handle), max_pending=MAX_PENDING
        )
        self._lanes = lanes
        async with trio.open_nursery() as nursery:
            await nursery.start(lanes.run)
            task_status.started()
            while True:
                items = await self.stream.read(GROUP, min(READ_BATCH, await lanes.room()))
                for item in items:
                    try:
                        msg = _decoder.decode(item.data)
                    except (msgspec.DecodeError, ValueError) as exc:
                        await self._reject(item.id, item.data, exc)
                        continue
                    lanes.put_nowait(msg.sender, (item.id, msg))

    async def _reject(self, item_id: str, data: bytes, exc: Exception) -> None:
        reason = "undecodable"
        if self._metrics is not None:
            self._metrics.rejected.labels(source=SOURCE, reason=reason).inc()
        log.warning(
            "inbox entry %s cannot be decoded (%s, %d bytes); dead-lettered",
            item_id,
            type(exc).__name__,
            len(data),
        )
        await self._dead.add(
            f"inbox_{reason}", f"inbox entry {item_id}: {type(exc).__name__}", payload=data
        )
        await self.stream.ack(GROUP, [item_id])

    async def _one(self, handle: Handler, sender: str, item: tuple[str, Inbound]) -> None:
        """One message of a sender's lane: a failed command is logged and counted, and
        the entry is acknowledged either way."""
        item_id, msg = item
        try:
            await handle(msg)
        except Exception as exc:
            if self._metrics is not None:
                self._metrics.rejected.labels(source=SOURCE, reason="handler_error").inc()
            log.error(
                "command from %s failed (message %s): %s",
                mask_phone(sender),
                message_ref(msg.id),
                type(exc).__name__,
            )
            log.debug("command failure", exc_info=True)
        await self.stream.ack(GROUP, [item_id])
