"""The router: MQTT message -> decoded Event -> outbox, and PUBACK once it is safe.

PUBACKs go out strictly in receipt order (MQTT 3.1.1 §4.6): the acker awaits each
message's receipt in turn. With Redis up a receipt is safe as soon as the batch
is appended; on the memory fallback it is safe once every sink finished it.
Bad input is dead-lettered and acknowledged: it can never block the stream.

A batch whose append fails unexpectedly (a bug, not a fenced session) is retried in
place, whole, then item by item; an item that still fails alone is dead-lettered
(kept, replayable) and acknowledged. Nothing later is acknowledged before it, and
nothing is acknowledged that was neither appended nor dead-lettered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import msgspec
import trio
from prometheus_client import Counter

from ..backoff import delays
from ..channels import queued_behind
from ..config import Settings
from ..errors import FencedError, InvalidMessage
from ..messages import Event, Heartbeat, Message
from ..metrics import Metrics
from ..queues.outbox import Outbox
from ..queues.streams import SAFE, Fence, Receipt
from ..redact import escape
from .mqtt import MqttMessage
from .topics import decode_mqtt

log = logging.getLogger(__name__)

BATCH: Final = 256
SLICE: Final = 0.005  # seconds of decoding before the router lets other tasks run
UNKNOWN_LOG_WINDOW: Final = 10.0  # seconds; per window, at most UNKNOWN_LOG_MAX lines
UNKNOWN_LOG_MAX: Final = 5  # "empresa not configured" lines per window (a flood: a summary)
APPEND_ATTEMPTS: Final = 3  # tries of a failing append, whole batch then each item alone
RETRY_FIRST: Final = 0.1  # seconds, ceiling of the first retry delay
RETRY_CAP: Final = 2.0  # seconds, largest retry delay


class Acker(Protocol):
    def ack(self, msg: MqttMessage) -> None: ...


class Router:
    def __init__(
        self,
        settings: Settings,
        outbox: Outbox,
        *,
        metrics: Metrics,
        observers: list[Callable[[Event], object]],
        fence: Fence | None = None,
    ) -> None:
        self.settings = settings
        self.fence = fence  # the MQTT session lease (ha.py): nothing is processed without it
        self.outbox = outbox
        self.metrics = metrics
        self._received: dict[str, Counter] = {}  # tipo -> its counter (labels() costs ~1.5 us)
        self.observers = observers
        self._known = {e.id for e in settings.empresas}
        self._max_payload = settings.mqtt.max_payload
        self._queued = 0  # messages handed to the acker, not yet acknowledged
        self._unknown_window = 0.0  # start of the current "not configured" log window
        self._unknown_logged = 0  # lines logged in that window
        self._unknown_quiet = 0  # ... and events not logged

    def reconfigure(self, settings: Settings) -> None:
        """Reload (SIGHUP): empresas added or removed count from the next message on."""
        self.settings = settings
        self._known = {e.id for e in settings.empresas}

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
                    batch = queued_behind(first, recv, BATCH)
                    try:
                        pairs = await self.process(batch)
                    except FencedError as exc:
                        # Another replica holds this MQTT session now: it gets these
                        # messages from the broker; acking or processing them here would
                        # process them twice.
                        self.metrics.rejected.labels(source="mqtt", reason="fenced").inc(len(batch))
                        log.warning("dropping %d MQTT messages unprocessed: %s", len(batch), exc)
                        if self.fence is not None:
                            self.fence.refused()  # ha.py reconnects if the lease is still ours
                        continue
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
        """Decode a batch, append what must be delivered, and pair each message with its receipt.

        Each message is its own failure boundary: whatever goes wrong while decoding one
        is logged once, counted, dead-lettered, and the next is processed."""
        out: list[tuple[MqttMessage, Receipt | None]] = []
        to_append: list[tuple[Event, str]] = []
        if self.fence is not None and not self.fence.valid():
            raise FencedError(f"session lease {self.fence.key} is not held by this replica")
        slice_end = time.perf_counter() + SLICE
        for m in batch:
            if time.perf_counter() > slice_end:  # a long batch must not hold the loop
                await trio.lowlevel.checkpoint()
                slice_end = time.perf_counter() + SLICE
            try:
                item = self._accept(m)
            except InvalidMessage as exc:
                await self._reject(m, exc)
                out.append((m, SAFE))
                continue
            except Exception as exc:  # noqa: BLE001 - a bug on one input must not stop intake
                log.exception("bug while decoding MQTT message on %s", escape(m.topic, 200))
                await self._reject(
                    m, InvalidMessage("internal_error", f"{type(exc).__name__}: {exc}")
                )
                out.append((m, SAFE))
                continue
            if item is None:
                out.append((m, SAFE))
                continue
            to_append.append(item)
            out.append((m, None))
        appended = [m for m, r in out if r is None]
        receipts = iter(await self._append(to_append, appended))
        return [(m, r if r is not None else next(receipts)) for m, r in out]

    async def _append(
        self, items: list[tuple[Event, str]], msgs: Sequence[MqttMessage]
    ) -> list[Receipt]:
        """The outbox append, retried in place on an unexpected failure (see the module
        docstring). A fenced session is not retried: the caller drops the batch."""
        if not items:  # heartbeats or rejects only: nothing to append
            return []
        receipts = await self._try_append(items, f"batch of {len(items)}")
        if receipts is not None:
            return receipts
        out: list[Receipt] = []
        for item, m in zip(items, msgs, strict=True):
            one = await self._try_append([item], f"event {item[0].id}")
            if one is None:  # kept as a dead letter instead: acknowledged, in order
                log.error("router: dead-lettering event %s, its append kept failing", item[0].id)
                self.metrics.rejected.labels(source="mqtt", reason="internal_error").inc()
                await self._dead_letter(m, InvalidMessage("internal_error", "outbox append failed"))
                out.append(SAFE)
            else:
                out.extend(one)
        return out

    async def _try_append(self, items: list[tuple[Event, str]], what: str) -> list[Receipt] | None:
        backoff = delays(RETRY_FIRST, RETRY_CAP)
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            try:
                return await self.outbox.append(items, fence=self.fence)
            except FencedError:
                raise
            except Exception:  # noqa: BLE001 - one bad append must not end intake
                self.metrics.intake_failures.labels(task="router").inc()
                log.exception(
                    "router: appending the %s to the outbox failed (attempt %d of %d)",
                    what, attempt, APPEND_ATTEMPTS,
                )  # fmt: skip
            if attempt < APPEND_ATTEMPTS:
                await trio.sleep(next(backoff))
        return None

    def _accept(self, m: MqttMessage) -> tuple[Event, str] | None:
        """One message: decoded, observed, and its (event, dedup key) when it must be
        delivered; None for a heartbeat (the watchdog consumed it)."""
        if m.length >= 0:  # mqtt.py cut it already: too large
            raise InvalidMessage(
                "too_large", f"payload of {m.length} bytes exceeds {self._max_payload}"
            )
        msg, event = decode_mqtt(m.payload, m.topic, m.received_ns, self._max_payload)
        received = self._received.get(event.tipo)
        if received is None:
            received = self._received[event.tipo] = self.metrics.received.labels(tipo=event.tipo)
        received.inc()
        if event.empresa and event.empresa not in self._known:
            event = msgspec.structs.replace(event, flags=(*event.flags, "empresa_desconocida"))
            self._warn_unknown(event)
        for observe in self.observers:
            try:
                observe(event)
            except Exception:  # noqa: BLE001 - the event is still delivered
                log.exception("observer %r failed on event %s", observe, event.id)
        if isinstance(msg, Heartbeat):
            return None
        if event.flags:
            for flag in event.flags:
                self.metrics.flagged.labels(flag=flag).inc()
            log.debug("event %s (tipo=%s) flagged: %s", event.id, event.tipo, ",".join(event.flags))
        key = ""
        if _has_identity(msg):
            key = f"?{event.id}" if m.dup else event.id
        return event, key

    def _warn_unknown(self, event: Event) -> None:
        """A few lines per window, then one summary: a flood of unconfigured empresas must
        not become a flood of log lines (each is a synchronous write)."""
        now = time.monotonic()
        if now - self._unknown_window >= UNKNOWN_LOG_WINDOW:
            if self._unknown_quiet:
                log.warning(
                    "%d more events from unconfigured empresas in %.0fs not logged one by one "
                    '(botonera_flagged_total{flag="empresa_desconocida"})',
                    self._unknown_quiet,
                    now - self._unknown_window,
                )
            self._unknown_window, self._unknown_logged, self._unknown_quiet = now, 0, 0
        if self._unknown_logged >= UNKNOWN_LOG_MAX:
            self._unknown_quiet += 1
            return
        self._unknown_logged += 1
        log.warning(
            "empresa %r is not configured: forwarding event %s flagged, "
            "WhatsApp goes to the central contacts",
            event.empresa,
            event.id,
        )

    async def _reject(self, m: MqttMessage, exc: InvalidMessage) -> None:
        self.metrics.received.labels(tipo="invalido").inc()
        self.metrics.rejected.labels(source="mqtt", reason=exc.reason).inc()
        log.error(
            "rejected MQTT message on %s (%d bytes): %s: %s; dead-lettered",
            escape(m.topic, 200),
            m.length if m.length >= 0 else len(m.payload),
            exc.reason,
            escape(exc.detail),
        )
        await self._dead_letter(m, exc)

    async def _dead_letter(self, m: MqttMessage, exc: InvalidMessage) -> None:
        # the dead-letter store keeps up to mqtt.max_payload bytes, the length and sha256
        try:
            await self.outbox.dead.add(
                exc.reason, exc.detail, payload=m.payload, topic=m.topic,
                length=m.length if m.length >= 0 else None, sha256=m.sha256 or None,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - logged above; the next message must go on
            log.exception("could not dead-letter the rejected message on %s", escape(m.topic, 200))


def _has_identity(msg: Message) -> bool:
    return msg.id is not None or msg.seq is not None
