"""The one nursery: every resource opened with ``async with``, every task started
with ``nursery.start``, and a two-phase shutdown on SIGTERM/SIGINT.

    mqtt reader ─chan─▶ router ─▶ outbox ─┬─▶ backend sink
                          │                └─▶ whatsapp sink
                          └─▶ watchdog, alarm book
    ws receiver ─▶ inbox ─▶ inbox workers (commands)
"""

from __future__ import annotations

import gc
import logging
import signal
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from . import USER_AGENT, texts
from .alarms import AlarmBook
from .backoff import delays
from .commands import CommandContext, escalation_loop, handle
from .config import Settings
from .errors import MqttError
from .health import Health
from .messages import Event, now_rfc3339
from .metrics import Metrics
from .mqtt import MqttClient, MqttMessage, open_mqtt
from .outbox import DeadLetters, Outbox, whatsapp_needs
from .queues.hashes import RedisHashes
from .queues.link import RedisLink
from .queues.redis_client import Redis, open_redis
from .queues.streams import DurableStream
from .router import Router
from .sdnotify import notify_loop, stopping
from .sinks.backend import BackendSink
from .sinks.http11 import Http11Pool, open_pool
from .sinks.whatsapp import WhatsAppSink
from .state import HashStore
from .watchdog import Watchdog
from .whatsapp_api import open_sender
from .ws_receiver import Inbound, receive

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

RECEIPT_TOPIC: Final = "botonera-bridge/receipts/"
RECEIPT_PUBLISH_WAIT: Final = 10.0  # seconds
INTAKE_BUFFER: Final = 512  # MQTT messages between reader and router
INBOX_GROUP: Final = "workers"
_receipt_encoder: Final = msgspec.json.Encoder()
_inbound_decoder: Final = msgspec.msgpack.Decoder(Inbound)
_inbound_encoder: Final = msgspec.msgpack.Encoder()


@asynccontextmanager
async def _maybe_redis(url: str) -> AsyncIterator[Redis | None]:
    if not url:
        yield None
        return
    async with open_redis(url) as r:
        yield r


class Bridge:
    """Everything one running bridge owns, built from Settings and passed down explicitly."""

    def __init__(self, settings: Settings, redis: Redis | None) -> None:
        s = self.settings = settings
        prefix = s.redis.prefix
        self.metrics = Metrics()
        self.health = Health(s.heartbeat.stall_timeout)
        self.link = RedisLink(redis, metrics=self.metrics, health=self.health)
        hashes = RedisHashes(self.link) if redis is not None else None
        self.dead = DeadLetters(self.link, f"{prefix}:dead", self.metrics)
        self.outbox = Outbox(
            self.link,
            prefix,
            consumer=s.mqtt.client_id,
            memory_limit=s.redis.memory_limit,
            dead=self.dead,
            reclaim_idle=s.redis.reclaim_idle,
            on_finished=self._publish_receipt,
        )
        self.inbox = DurableStream(
            self.link,
            f"{prefix}:inbox",
            (INBOX_GROUP,),
            consumer=s.mqtt.client_id,
            memory_limit=s.redis.memory_limit,
            dedup_prefix=f"{prefix}:seen:wa:",
        )
        self.devices = HashStore(f"{prefix}:devices", hashes)
        self.alarms = HashStore(f"{prefix}:alarms", hashes)
        self.watchdog = Watchdog(
            timeout=s.heartbeat.timeout,
            store=self.devices,
            emit=self.outbox.emit,
            metrics=self.metrics,
        )
        self.book = AlarmBook(
            self.alarms, escalation_after=s.escalation.after, escalation_max=s.escalation.max
        )
        self.router = Router(
            s, self.outbox, metrics=self.metrics, observers=[self.watchdog.seen, self.book.observe]
        )
        self.mqtt: MqttClient | None = None
        self.ready = trio.Event()
        self.backend_sink: BackendSink | None = None
        self._depth: dict[str, int] = {}
        self._backlog_at_start: dict[str, int] = {}
        self.ws_enabled = False

    async def _publish_receipt(self, event: Event, outcomes: dict[str, str]) -> None:
        body = {"id": event.id, "empresa": event.empresa} | outcomes
        if self.mqtt is None:
            return
        # Called from a sink's ack path: never let a broker outage hold a sink up.
        with trio.move_on_after(RECEIPT_PUBLISH_WAIT) as scope:
            try:
                payload = _receipt_encoder.encode(body)
                await self.mqtt.publish(RECEIPT_TOPIC + event.id, payload, qos=1)
            except MqttError as exc:
                log.warning("cannot publish send-test receipt for %s: %s", event.id, exc)
        if scope.cancelled_caught:
            log.warning("send-test receipt for %s not confirmed by the broker", event.id)

    async def publish(self, topic: str, payload: bytes) -> None:
        if self.mqtt is None:
            raise RuntimeError("MQTT is disabled (--no-mqtt)")
        await self.mqtt.publish(topic, payload, qos=1)

    # -- inbox -------------------------------------------------------------------------------
    async def on_inbound(self, msg: Inbound) -> None:
        # WhatsApp message ids are unique: any repeat is the gateway re-sending it.
        (receipt,) = await self.inbox.append([(_inbound_encoder.encode(msg), f"?{msg.id}")])
        del receipt  # inbound messages are not acknowledged upstream

    async def inbox_workers(self, ctx: CommandContext) -> None:
        """Process inbound messages in order per sender; senders proceed in parallel."""
        lanes: dict[str, deque[tuple[str, Inbound]]] = {}
        async with trio.open_nursery() as nursery:
            while True:
                items = await self.inbox.read(INBOX_GROUP, 100)
                for item in items:
                    try:
                        msg = _inbound_decoder.decode(item.data)
                    except msgspec.DecodeError:
                        await self.inbox.ack(INBOX_GROUP, [item.id])
                        continue
                    lane = lanes.get(msg.sender)
                    if lane is None:
                        lane = lanes[msg.sender] = deque()
                        nursery.start_soon(self._sender_lane, ctx, msg.sender, lane, lanes)
                    lane.append((item.id, msg))

    async def _sender_lane(
        self,
        ctx: CommandContext,
        sender: str,
        lane: deque[tuple[str, Inbound]],
        lanes: dict[str, deque[tuple[str, Inbound]]],
    ) -> None:
        while lane:
            item_id, msg = lane[0]
            try:
                await handle(ctx, msg, metrics=self.metrics)
            except Exception:
                log.exception("command from a WhatsApp user failed (message %s)", msg.id)
            lane.popleft()
            await self.inbox.ack(INBOX_GROUP, [item_id])
        del lanes[sender]

    # -- status --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        s = self.settings
        devices = self.watchdog.devices()
        book = self.book.snapshot()
        empresas = []
        for e in s.empresas:
            sem = self.book.semaforo(e.id)
            empresas.append(
                {
                    "id": e.id,
                    "nombre": e.label,
                    "semaforo": {"color": sem[0], "desde": _rfc(sem[1])} if sem else None,
                    "devices": [
                        {
                            "key": d.key,
                            "sede": d.sede,
                            "dispositivo": d.dispositivo,
                            "state": d.state,
                            "last_seen": _rfc(d.last_seen),
                        }
                        for d in devices
                        if d.empresa == e.id
                    ],
                    "alarmas": book.get(e.id, []),
                }
            )
        h = self.health
        comp = {
            c: {"up": bool(h.up.get(c)), "detalle": h.why_down.get(c, "")}
            for c in ("mqtt", "redis", "websocket")
        }
        backend_error = self.backend_sink.last_error if self.backend_sink else ""
        comp["backend"] = {"up": not backend_error, "detalle": backend_error}
        if not self.ws_enabled:
            comp["websocket"] = {"up": False, "detalle": "desactivado"}
        return {
            "components": comp,
            "empresas": empresas,
            "queues": {
                q: self._depth.get(q, 0)
                for q in ("outbox_backend", "outbox_whatsapp", "inbox", "dead")
            },
            "memory_fallback": not self.link.up,
            "invariante": self.invariant(),
            "counters": _counters(self.metrics),
        }

    def invariant(self) -> dict[str, dict[str, int | bool]]:
        """received = delivered + dead-lettered + in flight + queued, per sink.

        Counted for this process: what it appended, plus the backlog it found in the
        outbox at start, must equal what it finished plus what is still there.
        """
        out: dict[str, dict[str, int | bool]] = {}
        for g, done in self.outbox.finished_count.items():
            start = self._backlog_at_start.get(g)
            depth = self._depth.get(f"outbox_{g}", 0)
            received = self.outbox.stream.appended
            row: dict[str, int | bool] = {
                "recibidos": received,
                "pendientes_al_iniciar": start if start is not None else -1,
                "entregados": done["ok"] + done["skipped"],
                "dead_letters": done["failed"],
                "en_cola_o_en_vuelo": depth,
            }
            row["cumple"] = start is not None and received + start == (
                done["ok"] + done["skipped"] + done["failed"] + depth
            )
            out[g] = row
        return out

    async def gauges(self) -> None:
        """Refresh queue depths once a second, and from them each sink's stall report:
        one place, the outbox's own counters, for both sinks."""
        finished_before: dict[str, int] = {}
        while True:
            for g in ("backend", "whatsapp"):
                depth = self._depth[f"outbox_{g}"] = await self.outbox.stream.depth(g)
                finished = sum(self.outbox.finished_count[g].values())
                self._backlog_at_start.setdefault(g, depth + finished - self.outbox.stream.appended)
                if finished != finished_before.get(g):
                    self.health.progress(g, depth)
                else:
                    self.health.waiting(g, depth)
                finished_before[g] = finished
            self._depth["inbox"] = await self.inbox.depth(INBOX_GROUP)
            dead = len(self.dead.memory)
            if self.link.up and self.link.redis is not None:
                try:
                    dead += int(await self.link.redis.execute("XLEN", self.dead.key))
                except Exception as exc:  # noqa: BLE001 - the link notices Redis trouble itself
                    log.debug("XLEN %s failed: %s", self.dead.key, exc)
            self._depth["dead"] = dead
            self._depth["memory"] = self.outbox.stream.memory_items + self.inbox.memory_items
            for queue, n in self._depth.items():
                self.metrics.queue_depth.labels(queue=queue).set(n)
            await trio.sleep(1)


def _freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, config, tasks) out of the cyclic GC's
    reach. A full collection otherwise walks those ~50k objects and stalls the loop for
    20-40 ms every 10-20 s under load, the largest single latency spike measured. Garbage
    cycles are collected first, so nothing is leaked; ``run`` unfreezes on exit."""
    gc.collect()
    gc.freeze()


def _counters(m: Metrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in m.registry.collect():
        if family.type != "counter":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{label}}}" if label else sample.name] = sample.value
    return out


def _rfc(wall: float) -> str:
    return now_rfc3339(int(wall * 1e9))


async def _supervise(name: str, health: Health, fn: Callable[[], Awaitable[None]]) -> None:
    """Keep a long-lived task alive: a bug in one component must not silence the others."""
    backoff = delays(1.0, 30.0)
    while True:
        started = trio.current_time()
        try:
            await fn()
            return
        except Exception as exc:
            health.task_died(name, repr(exc))
            log.exception("task %s died; restarting it", name)
        if trio.current_time() - started > 60:
            backoff = delays(1.0, 30.0)
        await trio.sleep(next(backoff))
        health.dead.pop(name, None)


async def _open_backend_clients(
    stack: AsyncExitStack, s: Settings
) -> tuple[Http11Pool | None, httpx.AsyncClient | None]:
    """The keep-alive HTTP/1.1 pool for the hot path; httpx only where it is needed
    (an https backend, verify-empresa-sede): it costs ~4x the CPU per POST and 16 MB."""
    connections = max(4, s.backend.concurrency * 2)
    pool = None
    if s.backend.url.startswith("http://"):
        pool = await stack.enter_async_context(
            open_pool(
                s.backend.url,
                max_connections=connections,
                connect_timeout=s.backend.timeout,
                read_timeout=s.backend.timeout,
            )
        )
    http = None
    if pool is None or s.backend.verify:
        import httpx

        http = await stack.enter_async_context(
            httpx.AsyncClient(
                timeout=httpx.Timeout(s.backend.timeout),
                limits=httpx.Limits(max_connections=connections),
                headers={"User-Agent": USER_AGENT},
            )
        )
    return pool, http


async def run(settings: Settings, *, mqtt_enabled: bool = True, ws_enabled: bool = True) -> int:
    s = settings
    async with AsyncExitStack() as stack:
        stack.callback(gc.unfreeze)  # see _freeze_startup_objects
        redis = await stack.enter_async_context(_maybe_redis(s.redis.url))
        bridge = Bridge(s, redis)
        pool, http = await _open_backend_clients(stack, s)
        sender = await stack.enter_async_context(open_sender(s.whatsapp))
        wa_sink = WhatsAppSink(s, sender, metrics=bridge.metrics)
        bridge.outbox.needed_by["whatsapp"] = whatsapp_needs(wa_sink.recipients)

        async def tell_central(event: Event) -> None:
            await wa_sink.post(s.central, texts.unknown_to_backend_text(event))

        backend_sink = BackendSink(
            s.backend,
            pool=pool,
            client=http,
            user_agent=USER_AGENT,
            metrics=bridge.metrics,
            on_unknown=tell_central,
        )
        bridge.backend_sink = backend_sink
        mqtt = None
        if mqtt_enabled:
            mqtt = await stack.enter_async_context(
                open_mqtt(s.mqtt, health=bridge.health, metrics=bridge.metrics)
            )
            bridge.mqtt = mqtt
        ctx = CommandContext(
            settings=s,
            book=bridge.book,
            devices=bridge.watchdog.devices,
            send=wa_sink.post,
            publish=bridge.publish,
            emit=bridge.outbox.emit,
        )
        async with trio.open_nursery() as nursery:
            intake = trio.CancelScope()
            nursery.start_soon(
                _shutdown_on_signal, nursery.cancel_scope, intake, bridge, s.shutdown_grace
            )
            await nursery.start(bridge.link.run)
            await bridge.alarms.load()
            bridge.book.reload()
            if s.status.listen:
                from .status.server import serve_status  # hypercorn only when serving

                await nursery.start(
                    lambda task_status=trio.TASK_STATUS_IGNORED: serve_status(
                        s.status.listen,
                        metrics=bridge.metrics,
                        health=bridge.health,
                        snapshot=bridge.snapshot,
                        token=s.status.token,
                        task_status=task_status,
                    )
                )
            await nursery.start(bridge.watchdog.run)
            for stream in (bridge.outbox.stream, bridge.inbox):
                nursery.start_soon(
                    _supervise, f"maintenance {stream.key}", bridge.health, stream.run_maintenance
                )
            nursery.start_soon(_supervise, "gauges", bridge.health, bridge.gauges)
            nursery.start_soon(
                _supervise, "backend sink", bridge.health,
                lambda: backend_sink.run(bridge.outbox.delivery("backend")),
            )  # fmt: skip
            nursery.start_soon(
                _supervise, "whatsapp sink", bridge.health,
                lambda: wa_sink.run(bridge.outbox.delivery("whatsapp")),
            )  # fmt: skip
            nursery.start_soon(
                _supervise, "inbox workers", bridge.health, lambda: bridge.inbox_workers(ctx)
            )
            nursery.start_soon(
                _supervise, "escalation", bridge.health, lambda: escalation_loop(ctx)
            )
            nursery.start_soon(notify_loop, bridge.health, bridge.ready)

            async def intake_tasks(
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with intake:
                    async with trio.open_nursery() as n:
                        if ws_enabled and s.websocket.url:
                            bridge.ws_enabled = True
                            await n.start(partial(
                                receive, s.websocket.url, s.websocket.reconnect_delay,
                                bridge.on_inbound, health=bridge.health, metrics=bridge.metrics,
                            ))  # fmt: skip
                        if mqtt is not None:
                            send, recv = trio.open_memory_channel[MqttMessage](INTAKE_BUFFER)
                            await n.start(bridge.router.run, recv, mqtt)
                            await n.start(mqtt.run, send)
                        task_status.started()

            await nursery.start(intake_tasks)
            bridge.ready.set()
            _freeze_startup_objects()
            if not s.redis.url:
                log.warning(
                    "redis.url is empty: queues live in memory only; MQTT messages are "
                    "acknowledged only once delivered, and a crash loses nothing the broker "
                    "still holds, but dead letters and panel state do not survive a restart"
                )
            log.info(
                "botonera-bridge running: mqtt=%s websocket=%s redis=%s status=%s",
                f"{s.mqtt.broker}:{s.mqtt.port}" if mqtt is not None else "off",
                s.websocket.url if bridge.ws_enabled else "off",
                "up" if bridge.link.up else ("memory" if s.redis.url else "off"),
                s.status.listen or "off",
            )
    log.info("botonera-bridge stopped")
    return 0


async def _shutdown_on_signal(
    everything: trio.CancelScope, intake: trio.CancelScope, bridge: Bridge, grace: float
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info(
                "%s received: stopping intake, draining for up to %.0fs",
                signal.Signals(signum).name,
                grace,
            )
            stopping()
            intake.cancel()
            with trio.move_on_after(grace):
                # Memory-held events are lost on exit; Redis-held ones are not.
                # polled: shutdown only, and both sizes change in many places
                while bridge.outbox.stream.memory_items or bridge.inbox.memory_items:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            left = bridge.outbox.stream.memory_items
            if left:
                log.error(
                    "exiting with %d events only in memory "
                    "(unacknowledged: the broker redelivers them)",
                    left,
                )
            everything.cancel()
            return
