"""The inbound WhatsApp queue and its per-sender lanes.

Messages from the gateway's WebSocket and from the Cloud API webhook are appended
to one inbox stream (Redis, or memory while it is away), de-duplicated by message
id, and handled in order per sender; different senders proceed in parallel.

Each entry is handled in isolation: one that cannot be decoded is logged, counted
(``botonera_rejected_total{source="inbox"}``) and dead-lettered before it is
acknowledged; a command that fails is logged (message id masked: WAHA ids embed
the sender's number) and counted, and the lane goes on. At most
:data:`MAX_PENDING` entries are held in lanes at once: past that the workers stop
reading, and the rest waits in the stream.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
import trio

from .commands import message_ref
from .ids import mask_phone
from .metrics import Metrics
from .outbox import DeadLetters
from .queues.streams import DurableStream
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
        self._pending = 0
        self._room = trio.Event()

    async def append(self, msg: Inbound) -> None:
        """Queue one inbound message; a repeat of a message id is dropped by the stream."""
        # WhatsApp message ids are unique: any repeat is the gateway (or Meta) re-sending it.
        (receipt,) = await self.stream.append([(_encoder.encode(msg), f"?{msg.id}")])
        del receipt  # inbound messages are not acknowledged upstream

    @property
    def pending(self) -> int:
        return self._pending

    async def run(
        self, handle: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read the inbox forever and run ``handle`` per message, in order per sender."""
        lanes: dict[str, deque[tuple[str, Inbound]]] = {}
        self._pending = 0
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                while self._pending >= MAX_PENDING:
                    self._room = trio.Event()
                    await self._room.wait()
                items = await self.stream.read(GROUP, min(READ_BATCH, MAX_PENDING - self._pending))
                for item in items:
                    try:
                        msg = _decoder.decode(item.data)
                    except (msgspec.DecodeError, ValueError) as exc:
                        await self._reject(item.id, item.data, exc)
                        continue
                    lane = lanes.get(msg.sender)
                    if lane is None:
                        lane = lanes[msg.sender] = deque()
                        nursery.start_soon(self._lane, handle, msg.sender, lane, lanes)
                    lane.append((item.id, msg))
                    self._pending += 1

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

    async def _lane(
        self,
        handle: Handler,
        sender: str,
        lane: deque[tuple[str, Inbound]],
        lanes: dict[str, deque[tuple[str, Inbound]]],
    ) -> None:
        try:
            while lane:
                item_id, msg = lane[0]
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
                lane.popleft()
                self._pending -= 1
                self._room.set()
                await self.stream.ack(GROUP, [item_id])
        finally:
            del lanes[sender]
