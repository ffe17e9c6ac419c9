"""The backend sink: POST each event to the alert backend, in order per empresa.

Each empresa is a lane: its events go one at a time, retried forever on
transient failures, while other lanes proceed (bounded by ``concurrency``).
A permanent rejection (4xx other than 408/425/429) is dead-lettered at once
and the lane moves on, so one bad message never blocks anything behind it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

import trio

from ..backoff import delays
from ..config import BackendSettings
from ..errors import PermanentDelivery, TransientDelivery
from ..messages import Event
from ..metrics import Metrics
from ..outbox import Entry
from ..redact import escape, mask_urls_in
from .http11 import Http11Pool, HttpError

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)
_LOGGED_TIPOS: Final = frozenset({"alarmas", "semaforos"})

PROCESS_PATH: Final = "/api/mqtt-alerts/process"
VERIFY_PATH: Final = "/api/mqtt-alerts/verify-empresa-sede"
RETRY_STATUS: Final = frozenset({408, 425, 429})
MAX_INFLIGHT: Final = 5000  # entries read but not yet acknowledged
READ_BATCH: Final = 200
ACK_BATCH: Final = 500
MAX_LANES: Final = 64  # lane tasks at once (backend.concurrency POSTs run among them)


class Delivery(Protocol):
    async def read(self, count: int) -> list[Entry]: ...
    async def ack(self, entries: Sequence[Entry], outcome: str = "ok") -> None: ...
    async def dead_letter(self, entry: Entry, reason: str, detail: str) -> None: ...


def classify(status: int, body: str, retry_after: str | None) -> None:
    """Raise the delivery error a non-2xx status means; return for 2xx."""
    if 200 <= status < 300:
        return
    wait = _retry_after(retry_after)
    if status in RETRY_STATUS or status >= 500:
        raise TransientDelivery(
            f"HTTP {status}", sink="backend", status=status, body=body[:500], retry_after=wait
        )
    raise PermanentDelivery(f"HTTP {status}", sink="backend", status=status, body=body[:500])


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class BackendSink:
    """Delivers through ``pool`` (keep-alive HTTP/1.1, the cheap path) when given, else
    through ``client`` (httpx: https backends); ``client`` also serves verify."""

    def __init__(
        self,
        settings: BackendSettings,
        *,
        pool: Http11Pool | None = None,
        client: httpx.AsyncClient | None = None,
        user_agent: str,
        metrics: Metrics | None = None,
        on_unknown: Callable[[Event], Awaitable[None]] | None = None,
        on_result: Callable[[str, int, bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_unknown = on_unknown
        self._on_result = on_result  # (event id, HTTP status, accepted): the alarm timeline
        if pool is None and client is None:
            raise ValueError("BackendSink needs a pool or an httpx client")
        if settings.verify and client is None:
            raise ValueError("backend.verify needs an httpx client")
        self._pool = pool
        self._client = client
        self._metrics = metrics
        self._url = settings.url.rstrip("/") + PROCESS_PATH
        self._headers = {"Content-Type": "application/json", "User-Agent": user_agent}
        if settings.token:
            self._headers["Authorization"] = f"Bearer {settings.token}"
        self._raw_headers = [(k.lower().encode(), v.encode()) for k, v in self._headers.items()]
        self._verified: dict[tuple[str, str], tuple[bool, float]] = {}
        self._lanes: dict[str, deque[Entry]] = {}
        # at most MAX_LANES lane tasks: thousands of empresas would otherwise be thousands
        # of tasks parked on the limiter, and the GC pauses that scanning them costs
        self._waiting: deque[str] = deque()  # lanes with entries, not yet given a task
        self._live = 0  # lane tasks running
        self._start: Callable[[str], None] = lambda name: None
        self._inflight = 0
        self._room = trio.Event()
        self._limiter = trio.CapacityLimiter(max(1, settings.concurrency))
        self.last_error = ""  # empty while the backend accepts events

    @property
    def pending(self) -> int:
        return self._inflight

    async def run(
        self, delivery: Delivery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # A clean state on every (re)start: after a crash the old lanes' tasks are gone,
        # and whatever they held unacknowledged is read again from the outbox.
        self._lanes = {}
        self._inflight = 0
        self._room = trio.Event()
        self._waiting = deque()
        self._live = 0
        ack_send, ack_recv = trio.open_memory_channel[tuple[Entry, str]](ACK_BATCH * 4)
        async with trio.open_nursery() as nursery, ack_send:

            def start(name: str) -> None:
                nursery.start_soon(self._lane, name, self._lanes[name], delivery, ack_send.clone())

            self._start = start
            nursery.start_soon(self._acker, delivery, ack_recv)
            task_status.started()
            while True:
                while self._inflight >= MAX_INFLIGHT:
                    self._room = trio.Event()
                    await self._room.wait()
                entries = await delivery.read(min(READ_BATCH, MAX_INFLIGHT - self._inflight))
                self._inflight += len(entries)
                for entry in entries:
                    lane = self._lanes.get(entry.event.lane)
                    if lane is None:
                        lane = self._lanes[entry.event.lane] = deque()
                        if self._live < MAX_LANES:
                            self._live += 1
                            start(entry.event.lane)
                        else:
                            self._waiting.append(entry.event.lane)
                    lane.append(entry)

    async def _acker(
        self, delivery: Delivery, recv: trio.MemoryReceiveChannel[tuple[Entry, str]]
    ) -> None:
        async with recv:
            async for first in recv:
                batch = [first]
                while len(batch) < ACK_BATCH:
                    try:
                        batch.append(recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                for outcome in ("ok", "skipped"):
                    done = [e for e, o in batch if o == outcome]
                    if done:
                        await delivery.ack(done, outcome)
                self._inflight -= len(batch)
                self._room.set()

    async def _lane(
        self,
        name: str,
        queue: deque[Entry],
        delivery: Delivery,
        ack_send: trio.MemorySendChannel[tuple[Entry, str]],
    ) -> None:
        async with ack_send:
            while queue:
                entry = queue[0]
                try:
                    outcome = await self._deliver(entry)
                except PermanentDelivery as exc:
                    log.error(
                        "backend rejected event %s (empresa=%s tipo=%s): %s %s; dead-lettered",
                        entry.event.id, entry.event.empresa or "-", entry.event.tipo, exc,
                        escape(exc.body),
                    )  # fmt: skip
                    if self._on_result is not None:
                        self._on_result(entry.event.id, exc.status or 0, False)
                    await delivery.dead_letter(entry, exc.reason, f"{exc}: {exc.body}")
                    if exc.reason == "unknown_empresa" and self._on_unknown is not None:
                        await self._on_unknown(entry.event)
                    self._inflight -= 1
                    self._room.set()
                    queue.popleft()
                    continue
                queue.popleft()
                try:
                    ack_send.send_nowait((entry, outcome))
                except trio.WouldBlock:
                    await ack_send.send((entry, outcome))
            del self._lanes[name]
            if self._waiting:  # this task's place goes to the oldest waiting lane
                self._start(self._waiting.popleft())
            else:
                self._live -= 1

    async def _deliver(self, entry: Entry) -> str:
        event = entry.event
        if event.tipo == "heartbeat":
            return "skipped"
        if self.settings.verify and event.empresa and event.origen == "mqtt":
            await self._verify(event)
        attempt = 0
        backoff = delays(0.2, self.settings.retry_max_delay)
        body = event.backend_body()
        while True:
            attempt += 1
            try:
                try:  # a free slot without a scheduler pass: the POST itself checkpoints
                    self._limiter.acquire_nowait()
                    free = True
                except trio.WouldBlock:
                    free = False
                if not free:  # waited outside the except: no WouldBlock and traceback kept
                    await self._limiter.acquire()  # alive per waiting lane (GC pauses)
                try:
                    status = await self._post(body, event.id)
                finally:
                    self._limiter.release()
            except TransientDelivery as exc:
                self.last_error = mask_urls_in(str(exc))
                delay = next(backoff)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.settings.retry_max_delay))
                if self._metrics is not None:
                    self._metrics.retries.labels(sink="backend").inc()
                log.warning(
                    "backend delivery of %s (empresa=%s) failed, attempt %d, retry in %.1fs: %s",
                    event.id, event.empresa or "-", attempt, delay, self.last_error,
                )  # fmt: skip
                await trio.sleep(delay)
                continue
            break
        self.last_error = ""
        if self._on_result is not None:
            self._on_result(event.id, status, True)
        if self._metrics is not None:
            self._metrics.delivered.labels(sink="backend").inc()
            if event.received_ns:
                self._metrics.delivery_seconds.labels(sink="backend").observe(
                    max(0.0, (time.time_ns() - event.received_ns) / 1e9)
                )
        # INFO for what people act on (alarms, semáforos, watchdog/acks); a panel's estado
        # or configuracion every few seconds would wear out a Raspberry Pi's SD card
        loud = event.tipo in _LOGGED_TIPOS or event.origen != "mqtt"
        level = logging.INFO if loud else logging.DEBUG
        log.log(
            level,
            "delivered to backend: event=%s empresa=%s tipo=%s origen=%s attempts=%d",
            event.id, event.empresa or "-", event.tipo, event.origen, attempt,
            extra={"event_id": event.id, "empresa": event.empresa, "tipo": event.tipo,
                   "sink": "backend"},
        )  # fmt: skip
        return "ok"

    async def _post(self, body: bytes, key: str) -> int:
        if self._pool is not None:
            headers = [*self._raw_headers, (b"idempotency-key", key.encode())]
            try:
                status, text, rh = await self._pool.post(PROCESS_PATH, body, headers)
            except HttpError as exc:
                raise TransientDelivery(str(exc), sink="backend") from exc
            retry_after = rh.get(b"retry-after")
            classify(
                status,
                text.decode("utf-8", "replace"),
                retry_after.decode("latin-1") if retry_after else None,
            )
            return status
        import httpx

        assert self._client is not None
        hdrs = dict(self._headers, **{"Idempotency-Key": key})
        try:
            resp = await self._client.post(self._url, content=body, headers=hdrs)
        except httpx.TimeoutException as exc:
            raise TransientDelivery(f"timeout posting to {self._url}", sink="backend") from exc
        except httpx.HTTPError as exc:
            raise TransientDelivery(f"cannot reach {self._url}: {exc!r}", sink="backend") from exc
        classify(resp.status_code, resp.text, resp.headers.get("retry-after"))
        return resp.status_code

    async def _verify(self, event: Event) -> None:
        """Fail open: only a clear 404 stops an event; any other trouble lets it through."""
        key = (event.empresa, event.sede)
        cached = self._verified.get(key)
        now = trio.current_time()
        if cached is None or now - cached[1] > self.settings.verify_ttl:
            import httpx

            assert self._client is not None
            url = self.settings.url.rstrip("/") + VERIFY_PATH
            try:
                resp = await self._client.get(
                    url,
                    params={"empresa": event.empresa, "sede": event.sede},
                    headers=self._headers,
                )
            except httpx.HTTPError as exc:
                log.warning(
                    "verify-empresa-sede failed (%s); forwarding anyway", mask_urls_in(str(exc))
                )
                return
            if resp.status_code == 404:
                cached = (False, now)
            elif 200 <= resp.status_code < 300:
                cached = (True, now)
            else:
                log.warning("verify-empresa-sede answered %d; forwarding anyway", resp.status_code)
                return
            self._verified[key] = cached
        if not cached[0]:
            raise PermanentDelivery(
                f"empresa {event.empresa!r} sede {event.sede!r} unknown to the backend",
                sink="backend",
                status=404,
                reason="unknown_empresa",
            )
