"""The WhatsApp sink: outbox events -> rate-limited, coalesced WhatsApp messages.

Flow::

    delivery.read ─▶ reader ─▶ coalescing windows ─▶ per-number FIFO ─▶ one worker per number
                       │                                                  (spacing, global rate
                       │ skipped                                           limit, retries)
                       ▼                                                        │ message done
                     acker ◀────────────────────────────────────────────────────┘
                       └─▶ delivery.ack / delivery.dead_letter

* One worker task per number with queued messages, so a slow or failing number
  only delays itself; other numbers and empresas proceed.
* Identical alarms (same empresa, sede, tipo, tipo_alarma, descripcion; never
  prueba) within ``dedup_window`` are merged: the first one waits
  :data:`GATHER_DELAY` so a burst becomes one message with a count; later ones
  merge into it while it has not been sent; after that they are counted into a
  summary sent when the window ends. An entry is acked only when the message
  carrying it has been sent to, or permanently refused by, every recipient.
* At most ``max_in_flight`` entries are held (read but not acked); the reader
  stops reading while that many are in flight.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import trio

from .. import texts
from ..config import Empresa, Settings
from ..errors import PermanentDelivery, RedisError, TransientDelivery
from ..ids import mask_phone
from ..messages import Event
from ..metrics import Metrics
from ..whatsapp_api import Sender, WhatsAppRejected
from . import Delivery, DeliveryObserver, EntryLike

logger: Final = logging.getLogger("botonera_bridge.whatsapp")

SINK: Final = "whatsapp"
GATHER_DELAY: Final = 0.5  # seconds the first of possibly identical alarms waits for its twins
RETRY_BASE_DELAY: Final = 0.5  # seconds, first backoff ceiling
RETRY_MAX_DELAY: Final = 30.0  # seconds, backoff cap (Retry-After may ask for more)
MAX_IN_FLIGHT: Final = 512  # entries read but not yet acked
READ_BATCH: Final = 64  # entries per delivery.read
COALESCED_TIPOS: Final = frozenset({"alarmas", "semaforos"})
NOTIFIED_TIPOS: Final = frozenset({"alarmas", "semaforos"})  # on_notified hook

Clock = Callable[[], float]
_Key = tuple[str, str, str, str, str]


@dataclass(frozen=True)
class SinkStatistics:
    in_flight: int  # entries read, not yet acked
    queued: int  # (message, number) pairs waiting to be sent
    numbers: int  # numbers with queued messages
    windows: int  # open coalescing windows


class _AckJob(NamedTuple):
    entries: Sequence[EntryLike]
    outcome: str  # ok | skipped | failed
    reason: str = ""
    detail: str = ""


class _Message:
    """One WhatsApp text going to one or more numbers, carrying zero or more entries."""

    def __init__(
        self,
        kind: str,
        recipients: tuple[str, ...],
        *,
        ready_at: float,
        event: Event | None = None,
        empresa: Empresa | None = None,
        text: str = "",
    ) -> None:
        self.kind = kind  # alert | summary | direct
        self.recipients = recipients
        self.ready_at = ready_at
        self.event = event
        self.empresa = empresa
        self.text = text
        self.params: tuple[str, str, str] | None = None
        self.sealed = kind == "direct"  # text frozen: nothing merges into it any more
        self.entries: list[EntryLike] = []
        self.first_at = self.last_at = ready_at
        self.last_ns = 0
        self.pending = set(recipients)
        self.sent_to: set[str] = set()
        self.failures: dict[str, PermanentDelivery] = {}
        self.done = trio.Event()
        self.aborted = False

    def add(self, entry: EntryLike, now: float) -> None:
        if not self.entries:
            self.first_at = now
        self.entries.append(entry)
        self.last_at = now
        self.last_ns = entry.event.received_ns


class _Window:
    def __init__(self, message: _Message, end: float) -> None:
        self.message = message
        self.end = end
        self.summary: _Message | None = None


class _RateLimiter:
    """At most ``n`` acquisitions in any ``period`` seconds (sliding window), FIFO-fair."""

    def __init__(self, per_second: float, clock: Clock) -> None:
        self._clock = clock
        self._n = max(1, math.floor(per_second)) if per_second > 0 else 0
        self._period = self._n / per_second if per_second > 0 else 0.0
        self._stamps: deque[float] = deque(maxlen=max(self._n, 1))
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        if self._n == 0:  # max_per_second <= 0: no global limit
            return
        async with self._lock:
            if len(self._stamps) == self._n:
                await _sleep_until(self._stamps[0] + self._period, self._clock)
            self._stamps.append(self._clock())


async def _sleep_until(target: float, clock: Clock) -> None:
    if clock is trio.current_time:
        await trio.sleep_until(target)
    else:
        await trio.sleep(max(0.0, target - clock()))


def _unique(numbers: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for n in numbers if n))


def _code(exc: PermanentDelivery) -> str:
    if isinstance(exc, WhatsAppRejected):
        return exc.code
    return str(exc.status) if exc.status is not None else "rejected"


class WhatsAppSink:
    """Delivers outbox events as WhatsApp messages; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        sender: Sender,
        *,
        metrics: Metrics | None = None,
        clock: Clock = trio.current_time,
        on_notified: Callable[[Event], None] | None = None,
        observer: DeliveryObserver | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._wa = settings.whatsapp
        self._sender = sender
        self._metrics = metrics
        self._clock = clock
        self._on_notified = on_notified
        self._observer = observer
        self._max_in_flight = max(1, max_in_flight)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._limiter = _RateLimiter(self._wa.max_per_second, clock)
        self._queues: dict[str, deque[_Message]] = {}
        self._workers: set[str] = set()
        self._next_slot: dict[str, float] = {}
        self._windows: dict[_Key, _Window] = {}
        self._in_flight = 0
        self._room = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._acks: trio.MemorySendChannel[_AckJob] | None = None
        self._running = trio.Event()

    def reconfigure(self, settings: Settings) -> None:
        """Reload (SIGHUP): recipients (contactos, central) and names from the next
        notice on; rate limits and windows keep their running values."""
        self._settings = settings

    def _stopped(self) -> None:
        """run() ended: forget what was in flight (still pending in the outbox)."""
        self._nursery = self._acks = None
        self._running = trio.Event()
        for queue in self._queues.values():
            for message in queue:
                message.aborted = True
                message.done.set()
        self._queues.clear()
        self._workers.clear()
        self._windows.clear()
        self._in_flight = 0

    # -- public -------------------------------------------------------------

    async def run(
        self,
        delivery: Delivery[Any],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read batches from ``delivery`` and deliver them; returns only when cancelled.

        Entries not yet acked when cancelled stay pending in the outbox and are
        delivered again later (at least once).
        """
        send_acks, receive_acks = trio.open_memory_channel[_AckJob](self._max_in_flight)
        try:
            async with send_acks, receive_acks, trio.open_nursery() as nursery:
                self._nursery, self._acks = nursery, send_acks
                nursery.start_soon(self._acker, delivery, receive_acks)
                self._running.set()
                task_status.started()
                await self._reader(delivery)
        finally:
            self._stopped()

    async def send_now(self, to: Sequence[str], text: str) -> None:
        """Send ``text`` to each number, behind the same spacing and rate limits.

        Waits for :meth:`run` to be running. Returns once every number got it or
        refused it for good; raises PermanentDelivery when every number refused
        it, TransientDelivery when the sink stopped first. Transient failures are
        retried forever: bound the wait with ``move_on_after``; a cancelled
        caller leaves the message queued (it is still sent).
        """
        recipients = _unique(to)
        if not recipients:
            return
        await self._running.wait()
        message = _Message("direct", recipients, ready_at=self._clock(), text=text)
        self._enqueue(message)
        await message.done.wait()
        if message.aborted:
            raise TransientDelivery("the WhatsApp sink stopped before sending", sink=SINK)
        if message.failures and not message.sent_to:
            first = next(iter(message.failures.values()))
            raise PermanentDelivery(
                f"no recipient accepted the message: {self._failure_detail(message)}",
                sink=SINK,
                status=first.status,
            ) from first

    async def post(self, to: Sequence[str], text: str) -> None:
        """Queue ``text`` for each number and return at once (command replies,
        escalations): posts keep their order per number, and a number held back
        by the 6 s spacing never holds up the caller. Failures are logged by the
        delivery itself."""
        recipients = _unique(to)
        if not recipients:
            return
        await self._running.wait()
        self._enqueue(_Message("direct", recipients, ready_at=self._clock(), text=text))

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(
            in_flight=self._in_flight,
            queued=sum(len(q) for q in self._queues.values()),
            numbers=len(self._queues),
            windows=len(self._windows),
        )

    def recipients(self, event: Event) -> tuple[str, ...]:
        """The empresa's contacts; ``central`` when the empresa is unknown or missing."""
        empresa = self._settings.empresa(event.empresa) if event.empresa else None
        if empresa is None:
            return _unique(self._settings.central)
        return _unique(empresa.contactos)

    # -- reading ------------------------------------------------------------

    async def _reader(self, delivery: Delivery[Any]) -> None:
        assert self._acks is not None
        while True:
            while self._in_flight >= self._max_in_flight:
                self._room = trio.Event()
                await self._room.wait()
            entries: list[EntryLike] = await delivery.read(
                min(READ_BATCH, self._max_in_flight - self._in_flight)
            )
            self._in_flight += len(entries)
            skipped = [e for e in entries if not self._accept(e)]
            if skipped:
                await self._acks.send(_AckJob(skipped, "skipped"))

    def _key(self, event: Event) -> _Key | None:
        if event.prueba or event.tipo not in COALESCED_TIPOS or self._wa.dedup_window <= 0:
            return None
        d = event.detail
        return (
            event.empresa,
            event.sede,
            event.tipo,
            d.get("tipo_alarma", ""),
            d.get("descripcion", ""),
        )

    def _accept(self, entry: EntryLike) -> bool:
        """Route one entry into a message; False when it needs no WhatsApp message."""
        event = entry.event
        if not texts.notifies(event):
            return False
        recipients = self.recipients(event)
        if not recipients:
            return False
        empresa = self._settings.empresa(event.empresa) if event.empresa else None
        now = self._clock()
        key = self._key(event)
        if key is None:
            message = _Message("alert", recipients, ready_at=now, event=event, empresa=empresa)
            message.add(entry, now)
            self._enqueue(message)
            return True
        window = self._windows.get(key)
        if window is not None and now < window.end:
            if not window.message.sealed:
                window.message.add(entry, now)
            else:
                if window.summary is None:
                    window.summary = _Message(
                        "summary", recipients, ready_at=window.end, event=event, empresa=empresa
                    )
                window.summary.add(entry, now)
            return True
        message = _Message(
            "alert", recipients, ready_at=now + GATHER_DELAY, event=event, empresa=empresa
        )
        message.add(entry, now)
        window = _Window(message, end=now + self._wa.dedup_window)
        self._windows[key] = window
        assert self._nursery is not None
        self._nursery.start_soon(self._close_window, key, window)
        self._enqueue(message)
        return True

    async def _close_window(self, key: _Key, window: _Window) -> None:
        await _sleep_until(window.end, self._clock)
        if self._windows.get(key) is window:
            del self._windows[key]
        summary = window.summary
        if summary is not None and summary.entries:
            summary.ready_at = self._clock()
            self._enqueue(summary)

    # -- sending ------------------------------------------------------------

    def _enqueue(self, message: _Message) -> None:
        assert self._nursery is not None
        for number in message.recipients:
            self._queues.setdefault(number, deque()).append(message)
            if number not in self._workers:
                self._workers.add(number)
                self._nursery.start_soon(self._number_worker, number)

    async def _number_worker(self, number: str) -> None:
        queue = self._queues[number]
        try:
            while queue:
                message = queue[0]
                not_before = max(message.ready_at, self._next_slot.get(number, -math.inf))
                await _sleep_until(not_before, self._clock)
                await self._deliver(message, number)
                queue.popleft()
        finally:
            self._workers.discard(number)
            if not queue and self._queues.get(number) is queue:
                del self._queues[number]

    def _seal(self, message: _Message) -> None:
        message.sealed = True
        event = message.event
        if event is None:
            return
        span = message.last_at - message.first_at
        if message.kind == "summary":
            message.text = texts.summary_text(
                event, message.empresa, len(message.entries), last_ns=message.last_ns
            )
            place, what, _ = texts.template_params(event, message.empresa)
            message.params = (place, what, message.text.rsplit(" · ", 1)[-1])
        else:
            count = len(message.entries)
            message.text = texts.event_text(event, message.empresa, count=count, span_seconds=span)
            message.params = texts.template_params(
                event, message.empresa, count=count, span_seconds=span
            )

    async def _deliver(self, message: _Message, number: str) -> None:
        if not message.sealed:
            self._seal(message)
        attempt = 0
        while True:
            await self._limiter.acquire()
            started = self._clock()
            try:
                sent_id = await self._sender.send_text(
                    number, message.text, template_params=message.params
                )
            except TransientDelivery as exc:
                delay = self._backoff(attempt, exc.retry_after)
                attempt += 1
                if self._metrics is not None:
                    self._metrics.retries.labels(sink=SINK).inc()
                logger.warning(
                    "WhatsApp to %s failed (%s); retry %d in %.1f s",
                    mask_phone(number),
                    exc,
                    attempt,
                    delay,
                )
                await trio.sleep(delay)
                continue
            except PermanentDelivery as exc:
                logger.error("WhatsApp to %s refused for good: %s", mask_phone(number), exc)
                message.failures[number] = exc
                self._observe(message, number, None, str(exc))
            else:
                self._next_slot[number] = started + self._wa.min_interval
                first = not message.sent_to
                message.sent_to.add(number)
                if self._metrics is not None:
                    self._metrics.whatsapp_sent.labels(kind=message.kind).inc()
                logger.debug("WhatsApp %s sent to %s", message.kind, mask_phone(number))
                self._observe(message, number, sent_id, None)
                if first:
                    self._notified(message)
            break
        message.pending.discard(number)
        if not message.pending:
            await self._finish(message)

    def _observe(
        self, message: _Message, number: str, sent_id: str | None, failure: str | None
    ) -> None:
        if self._observer is None or not message.entries:
            return
        ids = [entry.event.id for entry in message.entries]
        try:
            if failure is None:
                self._observer.sent(number, sent_id, ids)
            else:
                self._observer.failed(number, ids, failure)
        except Exception:
            logger.exception("delivery observer failed for %s", mask_phone(number))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return max(0.0, retry_after)
        ceiling = min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2.0**attempt)
        return self._rng.uniform(0.0, ceiling)

    def _notified(self, message: _Message) -> None:
        event = message.event
        if (
            self._on_notified is None
            or message.kind != "alert"
            or event is None
            or event.prueba
            or event.tipo not in NOTIFIED_TIPOS
        ):
            return
        try:
            self._on_notified(event)
        except Exception:
            logger.exception("on_notified hook failed for event %s", event.id)

    def _failure_detail(self, message: _Message) -> str:
        return "; ".join(f"{mask_phone(n)}: {exc}" for n, exc in message.failures.items())

    async def _finish(self, message: _Message) -> None:
        message.done.set()
        if not message.entries:
            return
        assert self._acks is not None
        if message.sent_to or not message.failures:
            now_ns = time.time_ns()
            if self._metrics is not None:
                self._metrics.delivered.labels(sink=SINK).inc(len(message.entries))
                hist = self._metrics.delivery_seconds.labels(sink=SINK)
                for entry in message.entries:
                    if entry.event.received_ns:
                        hist.observe(max(0.0, (now_ns - entry.event.received_ns) / 1e9))
            await self._acks.send(_AckJob(message.entries, "ok"))
            return
        first = next(iter(message.failures.values()))
        detail = self._failure_detail(message)
        for entry in message.entries:
            await self._acks.send(_AckJob((entry,), "failed", f"whatsapp_{_code(first)}", detail))

    # -- acknowledging ------------------------------------------------------

    async def _acker(
        self, delivery: Delivery[Any], receive: trio.MemoryReceiveChannel[_AckJob]
    ) -> None:
        """The one task that talks back to the outbox, in completion order."""
        async for job in receive:
            attempt = 0
            while True:
                try:
                    if job.outcome == "failed":
                        await delivery.dead_letter(job.entries[0], job.reason, job.detail)
                    else:
                        await delivery.ack(job.entries, job.outcome)
                    break
                except RedisError as exc:
                    delay = self._backoff(attempt, None)
                    attempt += 1
                    logger.warning("whatsapp ack failed (%s); retry in %.1f s", exc, delay)
                    await trio.sleep(delay)
            self._in_flight -= len(job.entries)
            self._room.set()
