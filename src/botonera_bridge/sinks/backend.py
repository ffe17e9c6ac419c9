"""The backend sink: POST each event to the alert backend, in order per empresa.

Each empresa is a lane (:mod:`..lanes`): its events go one at a time, retried forever
on transient failures, while other lanes proceed (POSTs bounded by ``concurrency``).
A permanent rejection (4xx other than 408/425/429) is dead-lettered at once
and the lane moves on, so one bad message never blocks anything behind it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from .. import USER_AGENT
from ..backoff import delays
from ..channels import queued_behind
from ..config import BackendSettings
from ..errors import PermanentDelivery, TransientDelivery
from ..lanes import Lanes, LaneStatistics
from ..messages import Event
from ..metrics import Metrics
from ..redact import escape, mask_urls_in
from . import Delivery, E, EntryLike
from .http11 import Http11Pool, HttpError, open_pool

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)
_LOGGED_TIPOS: Final = frozenset({"alarmas", "semaforos"})

PROCESS_PATH: Final = "/api/mqtt-alerts/process"
VERIFY_PATH: Final = "/api/mqtt-alerts/verify-empresa-sede"
RETRY_STATUS: Final = frozenset({408, 425, 429})
MAX_INFLIGHT: Final = 5000  # entries in the lanes; the acker's channel holds ACK_BATCH * 4 more
READ_BATCH: Final = 200
ACK_BATCH: Final = 500
_encoder: Final = msgspec.json.Encoder()
_number_encoder: Final = msgspec.json.Encoder(decimal_format="number")
_lenient: Final = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal)
# Lane workers at once (backend.concurrency POSTs run among them): thousands of new
# empresas would otherwise be thousands of tasks parked on the limiter, and the GC
# pauses that scanning them costs (measured: 50-130 ms during an 8,000-empresa flood).
MAX_LANES: Final = 64
# Idle lane workers kept parked for the next lane: at a steady trickle every lane empties
# between items, and waking a parked task costs less than starting one (bench steady A/B).
KEEP_IDLE_LANES: Final = 16


def wire_body(event: Event) -> bytes:
    """The POST body: the original object with ``_bridge`` appended, spliced without
    re-encoding."""
    bridge = {"id": event.id, "topic": event.topic, "recibido_en": event.recibido_en}
    bridge["origen"] = event.origen
    meta: dict[str, Any] = dict(bridge)
    if event.flags:
        meta["flags"] = list(event.flags)
    tail = _encoder.encode(meta)
    body = event.payload.rstrip()
    if body.endswith(b"}") and b'"_bridge"' not in body:
        head = body[:-1].rstrip()
        sep = b"" if head.endswith(b"{") else b","
        return head + sep + b'"_bridge":' + tail + b"}"
    # numbers read as Decimal and written back as numbers: a 1e400 a lenient alarm
    # was accepted with must not make its delivery fail
    obj = _lenient.decode(event.payload)
    obj["_bridge"] = meta
    return _number_encoder.encode(obj)


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
        if metrics is not None:  # bound once: labels() costs ~1.5 us per call
            self._delivered = metrics.delivered.labels(sink="backend")
            self._delivery_seconds = metrics.delivery_seconds.labels(sink="backend")
        self._url = settings.url.rstrip("/") + PROCESS_PATH
        self._headers = {"Content-Type": "application/json", "User-Agent": user_agent}
        if settings.token:
            self._headers["Authorization"] = f"Bearer {settings.token}"
        self._raw_headers = [(k.lower().encode(), v.encode()) for k, v in self._headers.items()]
        self._verified: dict[tuple[str, str], tuple[bool, float]] = {}
        self._lanes: Lanes[str, Any] | None = None  # one per run
        self._acking = 0  # delivered, waiting for the acker
        self._limiter = trio.CapacityLimiter(max(1, settings.concurrency))
        self.last_error = ""  # empty while the backend accepts events

    @property
    def pending(self) -> int:
        """Entries read and not yet acknowledged: in the lanes, or waiting for the acker."""
        return (self._lanes.pending if self._lanes is not None else 0) + self._acking

    def lane_statistics(self) -> LaneStatistics | None:
        """The running lanes' statistics (for gauges); None before the first run."""
        return self._lanes.statistics() if self._lanes is not None else None

    async def run(
        self,
        delivery: Delivery[E],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # A clean state on every (re)start: after a crash the old lanes are gone, and
        # whatever they held unacknowledged is read again from the outbox.
        self._acking = 0
        ack_send, ack_recv = trio.open_memory_channel[tuple[E, str]](ACK_BATCH * 4)
        lanes: Lanes[str, E] = Lanes(
            partial(self._lane_item, delivery, ack_send),
            max_pending=MAX_INFLIGHT,
            max_workers=MAX_LANES,
            keep_idle=KEEP_IDLE_LANES,
        )
        self._lanes = lanes
        async with trio.open_nursery() as nursery, ack_send:
            await nursery.start(lanes.run)
            nursery.start_soon(self._acker, delivery, ack_recv)
            task_status.started()
            while True:
                entries = await delivery.read(min(READ_BATCH, await lanes.room()))
                for entry in entries:
                    lanes.put_nowait(entry.event.lane, entry)

    async def _acker(
        self, delivery: Delivery[E], recv: trio.MemoryReceiveChannel[tuple[E, str]]
    ) -> None:
        async with recv:
            async for first in recv:
                batch = queued_behind(first, recv, ACK_BATCH)
                for outcome in ("ok", "skipped"):
                    done = [e for e, o in batch if o == outcome]
                    if done:
                        await delivery.ack(done, outcome)
                self._acking -= len(batch)

    async def _lane_item(
        self,
        delivery: Delivery[E],
        ack_send: trio.MemorySendChannel[tuple[E, str]],
        lane: str,
        entry: E,
    ) -> None:
        """One entry of an empresa's lane: delivered (then acked in a batch), or dead-lettered."""
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
            return
        self._acking += 1
        try:
            ack_send.send_nowait((entry, outcome))
        except trio.WouldBlock:
            await ack_send.send((entry, outcome))

    async def _deliver(self, entry: EntryLike) -> str:
        event = entry.event
        if event.tipo == "heartbeat":
            return "skipped"
        if self.settings.verify and event.empresa and event.origen == "mqtt":
            await self._verify(event)
        attempt = 0
        backoff = delays(0.2, self.settings.retry_max_delay)
        body = wire_body(event)
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
            self._delivered.inc()
            if event.received_ns:
                self._delivery_seconds.observe(max(0.0, (time.time_ns() - event.received_ns) / 1e9))
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


@asynccontextmanager
async def open_backend_clients(
    settings: BackendSettings,
) -> AsyncIterator[tuple[Http11Pool | None, httpx.AsyncClient | None]]:
    """The keep-alive HTTP/1.1 pool for the hot path; httpx only where it is needed
    (an https backend, verify-empresa-sede): it costs ~4x the CPU per POST and 16 MB."""
    connections = max(4, settings.concurrency * 2)
    async with AsyncExitStack() as stack:
        pool = None
        if settings.url.startswith("http://"):
            pool = await stack.enter_async_context(
                open_pool(
                    settings.url,
                    max_connections=connections,
                    connect_timeout=settings.timeout,
                    read_timeout=settings.timeout,
                )
            )
        http = None
        if pool is None or settings.verify:
            import httpx

            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    timeout=httpx.Timeout(settings.timeout),
                    limits=httpx.Limits(max_connections=connections),
                    headers={"User-Agent": USER_AGENT},
                )
            )
        yield pool, http
