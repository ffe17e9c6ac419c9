"""The WhatsApp sink: outbox events -> per-number digests, one per 6 s slot.

Flow::

    delivery.read ─▶ reader ─▶ per-number pending notices ─▶ one worker per number
                       │        (identical repeats counted)     (slot, gather, digest,
                       │ skipped                                 global rate, retries)
                       ▼                                              │ sent / refused
                     acker ◀──────────────────────────────────────────┘
                       └─▶ delivery.ack / delivery.dead_letter

* **What waits for a number goes out together.** A number that is idle sends the
  first notice of an incident after a short gather (:data:`GATHER_QUIET` after the
  last arrival, at most :data:`GATHER_MAX` after the first), so alarms pressed
  together share the first message. Everything that queues while the number waits
  for its next slot (``min_interval`` after the previous send) goes out as one
  digest at that slot, ranked by urgency (:mod:`.digest`). Status notices alone
  gather longer (:data:`STATUS_GATHER_QUIET`, :data:`STATUS_GATHER_MAX`) so a site
  that loses power becomes one "12 paneles sin conexión" message; an alarm never
  waits for that.
* **Identical repeats are counted**: while pending they merge into one line
  (``×N``); once sent to a number, repeats within ``dedup_window`` seconds are
  held and sent as one "se repitió N veces más" summary when the window ends
  (``dedup_window = 0`` turns both off). prueba events never merge; watchdog
  offline/online events are never held.
* **Never hammer**: a 131056/130429/429 answer moves that number's next slot to
  ``max(min_interval, Retry-After)`` from now; other transient failures back off
  with :mod:`..backoff`. The failed digest's notices stay pending, so the retry
  also carries what arrived meanwhile. ``max_per_second`` bounds all sends.
* **At least once**: an outbox entry is acked only when the message carrying it
  was sent to, or permanently refused by, every recipient (dead-lettered when
  every recipient refused it). At most ``max_in_flight`` entries are held; the
  reader stops reading while that many are in flight.
* One worker per number with something pending (a lane of :mod:`..lanes`), so a
  slow or failing number only delays itself.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, NamedTuple

import trio

from .. import backoff
from ..config import Empresa, Settings
from ..errors import PermanentDelivery, RedisError, TransientDelivery
from ..ids import mask_phone
from ..lanes import Lanes, LaneStatistics
from ..messages import Event
from ..metrics import Metrics
from . import Delivery, DeliveryObserver, EntryLike, texts
from .digest import STATUS, Notice, RepeatKey, rank, render, repeat_key
from .whatsapp_api import Sender, WhatsAppRejected, WhatsAppThrottled

logger: Final = logging.getLogger("botonera_bridge.whatsapp")

SINK: Final = "whatsapp"
GATHER_QUIET: Final = 0.3  # seconds without new arrivals that end an urgent gather
GATHER_MAX: Final = 0.8  # seconds an urgent notice may wait for its companions
# Status-only digests (offline/online) wait longer: panels of a site that lost power are
# declared offline over a few seconds (the phase of their last beat), one message is better.
STATUS_GATHER_QUIET: Final = 3.0
STATUS_GATHER_MAX: Final = 15.0
RETRY_BASE_DELAY: Final = 0.5  # seconds, first backoff ceiling
RETRY_MAX_DELAY: Final = 30.0  # seconds, backoff cap (Retry-After may ask for more)
MAX_IN_FLIGHT: Final = 512  # entries read but not yet acked
MAX_RECENT: Final = 1024  # repeat windows remembered per number
READ_BATCH: Final = 64  # entries per delivery.read

Clock = Callable[[], float]


class _AckJob(NamedTuple):
    entries: Sequence[EntryLike]
    outcome: str  # ok | skipped | failed
    reason: str = ""
    detail: str = ""


class _Tracked:
    """One outbox entry on its way to every recipient."""

    __slots__ = ("entry", "failures", "pending", "sent_to")

    def __init__(self, entry: EntryLike, recipients: tuple[str, ...]) -> None:
        self.entry = entry
        self.pending = set(recipients)
        self.sent_to: set[str] = set()
        self.failures: dict[str, PermanentDelivery] = {}


class _Direct:
    """What a text from :meth:`WhatsAppSink.post` carries: nothing to acknowledge."""

    __slots__ = ()


_DIRECT: Final = _Direct()


class _Window:
    """Repeats of a notice already sent to one number, held until ``end``."""

    __slots__ = ("end", "held")

    def __init__(self, end: float) -> None:
        self.end = end
        self.held: Notice | None = None


class _Number:
    """Everything the sink keeps for one phone number."""

    def __init__(self, number: str) -> None:
        self.number = number
        self.pending: list[Notice] = []
        self.by_key: dict[RepeatKey, Notice] = {}
        self.windows: OrderedDict[RepeatKey, _Window] = OrderedDict()
        self.window_ends: list[tuple[float, int, RepeatKey, _Window]] = []  # held windows, heap
        self.next_slot = -math.inf
        self.first_urgent: float | None = None  # first arrival of the pending urgent notices
        self.first_status: float | None = None
        self.last_at = -math.inf
        self.retries: Iterator[float] | None = None
        self.changed = trio.Event()  # set when something arrives while its worker runs

    def ready_at(self) -> float:
        """When the gather of what is pending ends (not counting the slot)."""
        if self.first_urgent is not None:
            return min(self.first_urgent + GATHER_MAX, self.last_at + GATHER_QUIET)
        if self.first_status is not None:
            return min(self.first_status + STATUS_GATHER_MAX, self.last_at + STATUS_GATHER_QUIET)
        return math.inf

    def arrived(self, notice_rank: int, at: float) -> None:
        if notice_rank < STATUS:
            if self.first_urgent is None:
                self.first_urgent = at
        elif self.first_status is None:
            self.first_status = at
        self.last_at = max(self.last_at, at)

    def take(self) -> list[Notice]:
        """Everything pending, for one message; later arrivals start a new gather."""
        taken, self.pending = self.pending, []
        self.by_key.clear()
        self.first_urgent = self.first_status = None
        return taken

    def put_back(self, notices: list[Notice]) -> None:
        """A digest that could not be sent: merge its notices back in front."""
        for notice in notices:
            newer = self.by_key.get(notice.key) if notice.key is not None else None
            if newer is not None:  # a repeat arrived meanwhile: the older notice absorbs it
                for item in newer.carried:
                    notice.add(item, newer.first_at, newer.last_ns)
                self.pending.remove(newer)
            if notice.key is not None:
                self.by_key[notice.key] = notice
            self.arrived(notice.rank, notice.first_at)
        self.pending[:0] = notices

    def next_window_end(self) -> float:
        return self.window_ends[0][0] if self.window_ends else math.inf


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


def _failure_detail(failures: dict[str, PermanentDelivery]) -> str:
    return "; ".join(f"{mask_phone(n)}: {exc}" for n, exc in failures.items())


class WhatsAppSink:
    """Delivers outbox events as WhatsApp digests; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        sender: Sender,
        *,
        metrics: Metrics | None = None,
        clock: Clock = trio.current_time,
        observer: DeliveryObserver | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._wa = settings.whatsapp
        self._sender = sender
        self._metrics = metrics
        self._clock = clock
        self._observer = observer
        self._max_in_flight = max(1, max_in_flight)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._limiter = _RateLimiter(self._wa.max_per_second, clock)
        self._numbers: dict[str, _Number] = {}
        self._seq = 0
        self._in_flight = 0
        self._room = trio.Event()
        # one worker per number with something to do; the numbers come from the
        # configuration (contactos, central), so their count needs no bound of its own
        self._lanes: Lanes[str, _Number] | None = None
        self._acks: trio.MemorySendChannel[_AckJob] | None = None
        self._running = trio.Event()

    def reconfigure(self, settings: Settings) -> None:
        """Reload (SIGHUP): recipients (contactos, central) and names from the next
        notice on; rate limits and windows keep their running values."""
        self._settings = settings

    def _stopped(self) -> None:
        """run() ended: forget what was in flight (still pending in the outbox)."""
        self._lanes = self._acks = None
        self._running = trio.Event()
        for n in self._numbers.values():
            n.take()
            n.windows.clear()
            n.window_ends.clear()
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
                lanes: Lanes[str, _Number] = Lanes(self._number_worker, max_pending=None)
                await nursery.start(lanes.run)
                self._lanes, self._acks = lanes, send_acks
                nursery.start_soon(self._acker, delivery, receive_acks)
                self._running.set()
                task_status.started()
                await self._reader(delivery)
        finally:
            self._stopped()

    async def post(self, to: Sequence[str], text: str) -> None:
        """Queue ``text`` for each number and return at once (command replies,
        escalations): it goes out in the number's next slot, in one digest with
        whatever else waits (so many escalations at once are one message), and a
        number held back by the 6 s spacing never holds up the caller. Failures
        are logged by the delivery itself."""
        recipients = _unique(to)
        if not recipients:
            return
        await self._running.wait()
        self._add_direct(recipients, text)

    def lane_statistics(self) -> LaneStatistics | None:
        """The running per-number lanes' statistics (for gauges); None when not running."""
        return self._lanes.statistics() if self._lanes is not None else None

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

    def _accept(self, entry: EntryLike) -> bool:
        """Put one entry in front of each recipient; False when it needs no WhatsApp."""
        event = entry.event
        if not texts.notifies(event):
            return False
        recipients = self.recipients(event)
        if not recipients:
            return False
        tracked = _Tracked(entry, recipients)
        empresa = self._settings.empresa(event.empresa) if event.empresa else None
        key = repeat_key(event) if self._wa.dedup_window > 0 else None
        holdable = key is not None and event.origen != "watchdog"
        notice_rank = rank(event)
        now = self._clock()
        for number in recipients:
            n = self._number(number)
            if holdable and self._hold(n, key, event, empresa, tracked, now):
                continue
            notice = n.by_key.get(key) if key is not None else None
            if notice is None:
                notice = Notice(notice_rank, self._next_seq(), key, event=event, empresa=empresa)
                n.pending.append(notice)
                if key is not None:
                    n.by_key[key] = notice
            notice.add(tracked, now, event.received_ns)
            n.arrived(notice_rank, now)
            self._wake(n)
        return True

    def _hold(
        self,
        n: _Number,
        key: RepeatKey | None,
        event: Event,
        empresa: Empresa | None,
        tracked: _Tracked,
        now: float,
    ) -> bool:
        """A repeat of what this number was told within dedup_window: held for the summary."""
        assert key is not None
        window = n.windows.get(key)
        if window is None:
            return False
        if now >= window.end:
            if window.held is None:
                del n.windows[key]
            return False
        if window.held is None:
            window.held = Notice(STATUS, self._next_seq(), event=event, empresa=empresa)
            window.held.summary = True
            heapq.heappush(n.window_ends, (window.end, window.held.seq, key, window))
        window.held.add(tracked, now, event.received_ns)
        self._wake(n)
        return True

    def _add_direct(self, recipients: tuple[str, ...], text: str) -> None:
        now = self._clock()
        for number in recipients:
            n = self._number(number)
            notice = Notice(0, self._next_seq(), text=text)
            notice.add(_DIRECT, now, 0)
            n.pending.append(notice)
            n.arrived(notice.rank, now)
            self._wake(n)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _number(self, number: str) -> _Number:
        n = self._numbers.get(number)
        if n is None:
            n = self._numbers[number] = _Number(number)
        return n

    def _wake(self, n: _Number) -> None:
        assert self._lanes is not None
        if self._lanes.busy(n.number):
            n.changed.set()
        else:
            self._lanes.put_nowait(n.number, n)

    # -- sending ------------------------------------------------------------

    async def _number_worker(self, number: str, n: _Number) -> None:
        """The number's lane: send what is pending at each slot; return when nothing is."""
        while True:
            now = self._clock()
            self._release_windows(n, now)
            target = max(n.ready_at(), n.next_slot) if n.pending else math.inf
            target = min(target, n.next_window_end())
            if target == math.inf:
                return
            if target > now:
                n.changed = trio.Event()
                with trio.move_on_after(target - now):
                    await n.changed.wait()
                continue
            if n.pending:
                await self._send(n)

    def _release_windows(self, n: _Number, now: float) -> None:
        """Repeat windows that ended: their held repeats become a pending summary."""
        while n.window_ends and n.window_ends[0][0] <= now:
            _, _, key, window = heapq.heappop(n.window_ends)
            if n.windows.get(key) is window:  # else already released (evicted, replaced)
                del n.windows[key]
            if window.held is not None:
                self._release(n, window.held, now)
                window.held = None
        while n.windows:  # forget expired windows that hold nothing (oldest first)
            key, window = next(iter(n.windows.items()))
            if window.held is not None or window.end > now:
                break
            del n.windows[key]

    def _release(self, n: _Number, held: Notice, now: float) -> None:
        n.pending.append(held)
        n.arrived(held.rank, now)
        self._wake(n)

    def _remember(self, n: _Number, notices: list[Notice], now: float) -> None:
        """Open a repeat window for each notice just sent to ``n``."""
        window = self._wa.dedup_window
        for notice in notices:
            if notice.key is None or notice.summary or notice.watchdog_state is not None:
                continue
            old = n.windows.pop(notice.key, None)
            if old is not None and old.held is not None:  # an ended window not yet released
                self._release(n, old.held, now)
                old.held = None
            n.windows[notice.key] = _Window(now + window)
            while len(n.windows) > MAX_RECENT:
                _, oldest = n.windows.popitem(last=False)
                if oldest.held is not None:
                    self._release(n, oldest.held, now)
                    oldest.held = None

    async def _send(self, n: _Number) -> None:
        number = n.number
        notices = n.take()
        message = render(notices)
        try:
            await self._limiter.acquire()
            started = self._clock()
            sent_id = await self._sender.send_text(
                number, message.text, template_params=message.params
            )
        except TransientDelivery as exc:
            n.put_back(notices)
            if isinstance(exc, WhatsAppThrottled):  # Meta's own pacing: honour it
                delay = max(self._wa.min_interval, exc.retry_after or 0.0)
            else:
                if n.retries is None:
                    n.retries = backoff.delays(RETRY_BASE_DELAY, RETRY_MAX_DELAY, rng=self._rng)
                jitter = next(n.retries)
                delay = exc.retry_after if exc.retry_after is not None else jitter
            n.next_slot = max(n.next_slot, self._clock() + delay)
            if self._metrics is not None:
                self._metrics.retries.labels(sink=SINK).inc()
            logger.warning(
                "WhatsApp to %s failed (%s); retry in %.1f s", mask_phone(number), exc, delay
            )
            return
        except PermanentDelivery as exc:
            logger.error("WhatsApp to %s refused for good: %s", mask_phone(number), exc)
            n.retries = None
            await self._done(notices, number, None, exc)
            return
        n.retries = None
        n.next_slot = started + self._wa.min_interval
        if self._metrics is not None:
            self._metrics.whatsapp_sent.labels(kind=message.kind).inc()
        logger.debug(
            "WhatsApp %s (%d notices) sent to %s", message.kind, len(notices), mask_phone(number)
        )
        self._remember(n, notices, self._clock())
        await self._done(notices, number, sent_id, None)

    async def _done(
        self,
        notices: list[Notice],
        number: str,
        sent_id: str | None,
        failure: PermanentDelivery | None,
    ) -> None:
        """One message to ``number`` is finished: settle everything it carried."""
        ids: list[str] = []
        finished: list[_Tracked] = []
        for notice in notices:
            for item in notice.carried:
                if isinstance(item, _Direct):
                    continue
                assert isinstance(item, _Tracked)
                ids.append(item.entry.event.id)
                item.pending.discard(number)
                if failure is None:
                    item.sent_to.add(number)
                else:
                    item.failures[number] = failure
                if not item.pending:
                    finished.append(item)
        if ids:
            self._observe(number, sent_id, ids, failure)
        if finished:
            await self._finish(finished)

    def _observe(
        self, number: str, sent_id: str | None, ids: list[str], failure: PermanentDelivery | None
    ) -> None:
        if self._observer is None:
            return
        try:
            if failure is None:
                self._observer.sent(number, sent_id, ids)
            else:
                self._observer.failed(number, ids, str(failure))
        except Exception:
            logger.exception("delivery observer failed for %s", mask_phone(number))

    async def _finish(self, finished: list[_Tracked]) -> None:
        assert self._acks is not None
        ok = [t for t in finished if t.sent_to or not t.failures]
        if ok:
            now_ns = time.time_ns()
            if self._metrics is not None:
                self._metrics.delivered.labels(sink=SINK).inc(len(ok))
                hist = self._metrics.delivery_seconds.labels(sink=SINK)
                for t in ok:
                    if t.entry.event.received_ns:
                        hist.observe(max(0.0, (now_ns - t.entry.event.received_ns) / 1e9))
            await self._acks.send(_AckJob([t.entry for t in ok], "ok"))
        for t in finished:
            if t.sent_to or not t.failures:
                continue
            first = next(iter(t.failures.values()))
            detail = _failure_detail(t.failures)
            await self._acks.send(_AckJob((t.entry,), "failed", f"whatsapp_{_code(first)}", detail))

    # -- acknowledging ------------------------------------------------------

    async def _acker(
        self, delivery: Delivery[Any], receive: trio.MemoryReceiveChannel[_AckJob]
    ) -> None:
        """The one task that talks back to the outbox, in completion order."""
        retries: Iterator[float] | None = None
        async for job in receive:
            while True:
                try:
                    if job.outcome == "failed":
                        await delivery.dead_letter(job.entries[0], job.reason, job.detail)
                    else:
                        await delivery.ack(job.entries, job.outcome)
                    retries = None
                    break
                except RedisError as exc:
                    if retries is None:
                        retries = backoff.delays(RETRY_BASE_DELAY, RETRY_MAX_DELAY, rng=self._rng)
                    delay = next(retries)
                    logger.warning("whatsapp ack failed (%s); retry in %.1f s", exc, delay)
                    await trio.sleep(delay)
            self._in_flight -= len(job.entries)
            self._room.set()
