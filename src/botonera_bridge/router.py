"""The router: MQTT message -> decoded Event -> outbox, and PUBACK once it is safe.

PUBACKs go out strictly in receipt order (MQTT 3.1.1 §4.6): the acker awaits each
message's receipt in turn. With Redis up a receipt is safe as soon as the batch
is appended; on the memory fallback it is safe once every sink finished it.
Bad input is dead-lettered and acknowledged: it can never block the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Protocol

import msgspec
import trio

from .config import Settings
from .errors import InvalidMessage
from .messages import Event, Heartbeat, Message, decode
from .metrics import Metrics
from .mqtt import MqttMessage
from .outbox import Outbox
from .queues.streams import SAFE, Receipt

log = logging.getLogger(__name__)

BATCH: Final = 256
DEAD_PAYLOAD_MAX: Final = 1 << 20  # bytes of a rejected payload kept for inspection


class Acker(Protocol):
    def ack(self, msg: MqttMessage) -> None: ...


class Observer(Protocol):
    def seen(self, event: Event) -> None: ...


class Router:
    def __init__(
        self,
        settings: Settings,
        outbox: Outbox,
        *,
        metrics: Metrics,
        observers: list[Callable[[Event], object]],
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.metrics = metrics
        self.observers = observers
        self._known = {e.id for e in settings.empresas}
        self._max_payload = settings.mqtt.max_payload
        self._queued = 0  # messages handed to the acker, not yet acknowledged

    async def run(
        self,
        recv: trio.MemoryReceiveChannel[MqttMessage],
        mqtt: Acker,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        ack_send, ack_recv = trio.open_memory_channel[tuple[MqttMessage, Receipt]](BATCH * 4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._acker, ack_recv, mqtt)
            task_status.started()
            async with recv, ack_send:
                async for first in recv:
                    batch = [first]
                    while len(batch) < BATCH:
                        try:
                            batch.append(recv.receive_nowait())
                        except trio.WouldBlock:
                            break
                    pairs = await self.process(batch)
                    if not self._queued and all(r.safe for _, r in pairs):
                        for m, _ in pairs:  # in order, nothing ahead: PUBACK now (no hop)
                            mqtt.ack(m)
                        continue
                    for pair in pairs:
                        self._queued += 1
                        await ack_send.send(pair)

    async def _acker(
        self, recv: trio.MemoryReceiveChannel[tuple[MqttMessage, Receipt]], mqtt: Acker
    ) -> None:
        async with recv:
            async for msg, receipt in recv:
                await receipt.wait()
                mqtt.ack(msg)
                self._queued -= 1

    async def process(self, batch: list[MqttMessage]) -> list[tuple[MqttMessage, Receipt]]:
        """Decode a batch, append what must be delivered, and pair each message with its receipt."""
        out: list[tuple[MqttMessage, Receipt | None]] = []
        to_append: list[tuple[Event, str]] = []
        for m in batch:
            try:
                msg, event = decode(m.payload, m.topic, m.received_ns, self._max_payload)
            except InvalidMessage as exc:
                await self._reject(m, exc)
                out.append((m, SAFE))
                continue
            self.metrics.received.labels(tipo=event.tipo).inc()
            if event.empresa and event.empresa not in self._known:
                event = msgspec.structs.replace(event, flags=(*event.flags, "empresa_desconocida"))
                log.warning(
                    "empresa %r is not configured: forwarding event %s flagged, "
                    "WhatsApp goes to the central contacts",
                    event.empresa,
                    event.id,
                )
            for observe in self.observers:
                observe(event)
            if isinstance(msg, Heartbeat):
                out.append((m, SAFE))
                continue
            if event.flags:
                log.debug(
                    "event %s (tipo=%s) flagged: %s", event.id, event.tipo, ",".join(event.flags)
                )
            key = ""
            if _has_identity(msg):
                key = f"?{event.id}" if m.dup else event.id
            to_append.append((event, key))
            out.append((m, None))
        receipts = iter(await self.outbox.append(to_append))
        return [(m, r if r is not None else next(receipts)) for m, r in out]

    async def _reject(self, m: MqttMessage, exc: InvalidMessage) -> None:
        self.metrics.received.labels(tipo="invalido").inc()
        log.error(
            "rejected MQTT message on %s (%d bytes): %s; dead-lettered",
            m.topic,
            len(m.payload),
            exc,
        )
        payload = m.payload[:DEAD_PAYLOAD_MAX]
        detail = (
            exc.detail if len(m.payload) == len(payload) else f"{exc.detail} (payload truncated)"
        )
        await self.outbox.dead.add(exc.reason, detail, payload=payload, topic=m.topic)


def _has_identity(msg: Message) -> bool:
    return msg.id is not None or msg.seq is not None
