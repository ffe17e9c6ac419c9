"""The one nursery: every resource opened with ``async with``, every task started
with ``nursery.start``, and a two-phase shutdown on SIGTERM/SIGINT.

    mqtt reader ─chan─▶ router ─▶ outbox ─┬─▶ backend sink
                          │                └─▶ whatsapp sink
                          └─▶ watchdog, alarm book
    ws receiver ─┬▶ inbox ─▶ inbox workers (commands)
    webhook ─────┘  receipts ─▶ timelines (also fed by both sinks)
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from . import USER_AGENT, heap, texts
from .alarms import AlarmBook
from .backoff import delays
from .commands import CommandContext, escalation_loop, handle
from .config import Live, RedisSettings, Settings
from .errors import MqttError, RedisError
from .health import Health
from .inbox import GROUP as INBOX_GROUP
from .inbox import Inbox
from .messages import Event
from .metrics import Metrics
from .mqtt import MqttClient, MqttMessage, open_mqtt
from .outbox import DeadLetters, Outbox, whatsapp_needs
from .queues.hashes import RedisHashes
from .queues.link import RedisLink
from .queues.redis_client import Redis, open_redis_settings
from .queues.streams import DurableStream, Fence
from .receipts import Receipt, Timelines
from .redact import mask_url, mask_urls_in
from .reload import reload
from .router import Router
from .sdnotify import notify_loop, stopping
from .sinks.backend import BackendSink
from .sinks.http11 import Http11Pool, open_pool
from .sinks.whatsapp import WhatsAppSink
from .state import HashStore
from .status.model import empresas_view
from .watchdog import Watchdog, inventory
from .webhook import Webhook
from .whatsapp_api import open_sender
from .ws_receiver import receive

if TYPE_CHECKING:
    import httpx

    from .ha import Replicas

log = logging.getLogger(__name__)

RECEIPT_TOPIC: Final = "botonera-bridge/receipts/"
RECEIPT_PUBLISH_WAIT: Final = 10.0  # seconds
INTAKE_BUFFER: Final = 512  # MQTT messages between reader and router
_receipt_encoder: Final = msgspec.json.Encoder()


@asynccontextmanager
async def _maybe_redis(rs: RedisSettings) -> AsyncIterator[Redis | None]:
    if not rs.url:
        yield None
        return
    async with open_redis_settings(rs) as r:
        yield r


class Bridge:
    """Everything one running bridge owns, built from Settings and passed down explicitly."""

    def __init__(self, settings: Settings, redis: Redis | None) -> None:
        s = self.settings = settings
        prefix = s.redis.prefix
        self.metrics = Metrics()
        self.metrics.memory_fallback_limit.set(s.redis.memory_limit)
        self.health = Health(s.heartbeat.stall_timeout)
        self.link = RedisLink(redis, metrics=self.metrics, health=self.health)
        hashes = RedisHashes(self.link) if redis is not None else None
        self.dead = DeadLetters(
            self.link,
            f"{prefix}:dead",
            self.metrics,
            max_payload=s.mqtt.max_payload,
            dead_max=s.redis.dead_max,
        )
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
            max_devices=s.heartbeat.max_devices,
            forget_after=s.heartbeat.forget_after,
            inventory=inventory(s.empresas),
        )
        self.inbound = Inbox(self.inbox, dead=self.dead, metrics=self.metrics)
        self.book = AlarmBook(
            self.alarms,
            escalation_after=s.escalation.after,
            escalation_max=s.escalation.max,
            configured=lambda empresa: self.settings.empresa(empresa) is not None,
        )
        self.timelines = Timelines(self.alarms, clock=self.book.clock)
        self.router = self.make_router()
        self.replicas: Replicas | None = None  # [ha] enabled
        self.mqtt: MqttClient | None = None
        self.ready = trio.Event()  # subscribed: the "running" log line
        self.started = trio.Event()  # every task started: systemd READY=1 (broker or not)
        self.backend_sink: BackendSink | None = None
        self._depth: dict[str, int] = {}
        self._backlog_at_start: dict[str, int] = {}
        self.ws_enabled = False

    def make_router(self, fence: Fence | None = None) -> Router:
        """A router into the outbox; ``fence``: the MQTT session lease (ha.py)."""
        observers: list[Callable[[Event], object]] = [self.watchdog.seen, self._observe]
        return Router(self.settings, self.outbox, metrics=self.metrics, observers=observers,
                      fence=fence)  # fmt: skip

    async def take_over(self, replica: str) -> None:
        """After adopting a dead replica's MQTT session (ha.py): take its pending outbox and
        inbox entries now (not after redis.reclaim_idle), and the open alarms (with their
        escalation state) it wrote to Redis; this replica's own board entries win."""
        for stream in (self.outbox.stream, self.inbox):
            try:
                await stream.take_over(replica)
            except RedisError as exc:  # maintenance reclaims them later anyway
                log.warning("cannot take over %s entries of %s: %s", stream.key, replica, exc)
        await self.book.flush()
        await self.alarms.load()
        self.book.reload()
        self.timelines.reload()

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

    def _observe(self, event: Event) -> None:
        self.timelines.track(self.book.observe(event))

    async def on_receipt(self, receipt: Receipt) -> None:
        self.timelines.receipt(receipt)

    # -- status --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        empresas = empresas_view(self.settings, self.watchdog.devices_of, self.book, self.timelines)
        h = self.health
        comp = {
            c: {"up": bool(h.up.get(c)), "detalle": h.why_down.get(c, "")}
            for c in ("mqtt", "redis", "websocket")
        }
        backend_error = self.backend_sink.last_error if self.backend_sink else ""
        for c in comp.values():
            c["detalle"] = mask_urls_in(str(c["detalle"]))
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
            "ha": self.replicas.snapshot() if self.replicas else {"enabled": False},
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

    def _open_alarm_gauges(self) -> None:
        """botonera_open_alarms{empresa_bucket}: bounded labels (configured empresas and
        one shared bucket), from the board's own bounded snapshot, once a second."""
        configured = {e.id for e in self.settings.empresas}
        counts = dict.fromkeys([*configured, "sin_configurar"], 0)
        for empresa, alarms in self.book.snapshot().items():
            counts[_bucket(empresa, configured)] += sum(1 for a in alarms if a["acuse"] is None)
        for bucket, n in counts.items():
            self.metrics.open_alarms.labels(empresa_bucket=bucket).set(n)

    async def gauges(self) -> None:
        """Refresh queue depths once a second, and from them each sink's stall report:
        one place, the outbox's own counters, for both sinks."""
        finished_before: dict[str, int] = {}
        retries_before: dict[str, float] = {}
        while True:
            for g in ("backend", "whatsapp"):
                retries = self.metrics.registry.get_sample_value(
                    "botonera_retries_total", {"sink": g}
                )
                if retries is not None and retries != retries_before.get(g, retries):
                    self.health.attempted(g)  # failing against an outage is not being stuck
                retries_before[g] = retries or 0.0
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
            self._open_alarm_gauges()
            await trio.sleep(1)


def _bucket(empresa: str, configured: set[str]) -> str:
    return empresa if empresa in configured else "sin_configurar"


def _freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, config, tasks) out of the cyclic GC's
    reach. A full collection otherwise walks those ~50k objects and stalls the loop for
    20-40 ms every 10-20 s under load, the largest single latency spike measured. Garbage
    cycles are collected first, so nothing is leaked; ``run`` unfreezes on exit. Then the
    heap pages start-up freed go back to the kernel (idle RSS)."""
    gc.collect()
    gc.freeze()
    heap.trim()


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


def _webhook(s: Settings, metrics: Metrics) -> Webhook | None:
    """The Cloud API webhook, when the Cloud API is used or the webhook is configured."""
    wa = s.whatsapp
    if wa.provider != "cloud" and not (wa.app_secret or wa.verify_token):
        return None
    if not s.status.listen:
        log.warning("status.listen is empty: the Cloud API webhook is not served")
        return None
    if not wa.app_secret:
        log.warning(
            "whatsapp.app_secret is not set: the webhook refuses every POST (replies and "
            "delivery statuses from the Cloud API are not received)"
        )
    return Webhook(app_secret=wa.app_secret, verify_token=wa.verify_token, metrics=metrics)


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
        redis = await stack.enter_async_context(_maybe_redis(s.redis))
        bridge = Bridge(s, redis)
        pool, http = await _open_backend_clients(stack, s)
        sender = await stack.enter_async_context(open_sender(s.whatsapp))
        wa_sink = WhatsAppSink(s, sender, metrics=bridge.metrics, observer=bridge.timelines)
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
            on_result=bridge.timelines.backend_result,
        )
        bridge.backend_sink = backend_sink
        mqtt = None
        if mqtt_enabled:
            mqtt = await stack.enter_async_context(
                open_mqtt(s.mqtt, health=bridge.health, metrics=bridge.metrics)
            )
            bridge.mqtt = mqtt
        if s.ha.enabled and redis is not None:
            from .ha import Replicas

            bridge.replicas = Replicas(
                s, redis, make_router=bridge.make_router, on_takeover=bridge.take_over,
                health=bridge.health, metrics=bridge.metrics,
            )  # fmt: skip
            bridge.router.fence = bridge.replicas.own
            if mqtt is not None:
                mqtt.gate = bridge.replicas.own_gate
                bridge.replicas.own_mqtt = mqtt
        ctx = CommandContext(
            settings=s,
            book=bridge.book,
            devices=bridge.watchdog.devices,
            send=wa_sink.post,
            publish=bridge.publish,
            emit=bridge.outbox.emit,
            metrics=bridge.metrics,
            timelines=bridge.timelines,
        )
        live = Live(s)

        def on_reload(new: Settings) -> None:  # SIGHUP: what applies at once, see reload.py
            bridge.settings = ctx.settings = new
            bridge.router.reconfigure(new)
            wa_sink.reconfigure(new)
            bridge.book.after, bridge.book.max = new.escalation.after, new.escalation.max
            bridge.watchdog.reconfigure(inventory(new.empresas))
            reconfigure_sender = getattr(sender, "reconfigure", None)
            if reconfigure_sender is not None:
                reconfigure_sender(new.whatsapp)

        live.subscribe(on_reload)
        webhook = _webhook(s, bridge.metrics)
        async with trio.open_nursery() as nursery:
            intake = trio.CancelScope()
            nursery.start_soon(
                _shutdown_on_signal, nursery.cancel_scope, intake, bridge, s.shutdown_grace, live
            )
            await nursery.start(bridge.link.run)
            await bridge.alarms.load()
            bridge.book.reload()
            bridge.timelines.reload()
            if bridge.replicas is not None:
                await nursery.start(bridge.replicas.run)
            if s.status.listen:
                from .status.server import serve_status  # hypercorn only when serving

                await nursery.start(
                    lambda task_status=trio.TASK_STATUS_IGNORED: serve_status(
                        s.status.listen,
                        metrics=bridge.metrics,
                        health=bridge.health,
                        snapshot=bridge.snapshot,
                        token=s.status.token,
                        alarm=bridge.timelines.public,
                        webhook=webhook,
                        task_status=task_status,
                    )
                )
            await bridge.watchdog.load()
            nursery.start_soon(_supervise, "watchdog", bridge.health, bridge.watchdog.loop)
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
                _supervise, "inbox workers", bridge.health,
                lambda: bridge.inbound.run(partial(handle, ctx, metrics=bridge.metrics)),
            )  # fmt: skip
            if webhook is not None:
                nursery.start_soon(
                    _supervise, "webhook", bridge.health,
                    lambda: webhook.run(bridge.inbound.append, bridge.on_receipt),
                )  # fmt: skip
            nursery.start_soon(
                _supervise, "escalation", bridge.health, lambda: escalation_loop(ctx)
            )
            nursery.start_soon(notify_loop, bridge.health, bridge.started)

            async def intake_tasks(
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with intake:
                    async with trio.open_nursery() as n:
                        if ws_enabled and s.websocket.url:
                            bridge.ws_enabled = True
                            await n.start(partial(
                                receive, s.websocket.url, s.websocket.reconnect_delay,
                                bridge.inbound.append, on_receipt=bridge.on_receipt,
                                health=bridge.health, metrics=bridge.metrics,
                            ))  # fmt: skip
                        if mqtt is not None:
                            send, recv = trio.open_memory_channel[MqttMessage](INTAKE_BUFFER)
                            await n.start(bridge.router.run, recv, mqtt)
                            # the MQTT task retries the broker by itself: not a reason to wait
                            bridge.started.set()
                            await n.start(mqtt.run, send)
                        bridge.started.set()
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
                mask_url(s.websocket.url) if bridge.ws_enabled else "off",
                "up" if bridge.link.up else ("memory" if s.redis.url else "off"),
                s.status.listen or "off",
            )
    log.info("botonera-bridge stopped")
    return 0


async def _shutdown_on_signal(
    everything: trio.CancelScope,
    intake: trio.CancelScope,
    bridge: Bridge,
    grace: float,
    live: Live,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP received: reloading the configuration")
                reload(live, bridge.metrics)
                continue
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
