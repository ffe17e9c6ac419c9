"""Wiring: open every resource with ``async with``, build each component from its
explicit inputs, start the tasks, and stop in two phases on SIGTERM/SIGINT.

    panels ─MQTT─▶ mqtt.run ─chan─▶ router.run ─▶ outbox ─┬─▶ backend sink ─▶ backend
                                      │                    └─▶ whatsapp sink ─▶ gateway/Cloud API
                                      └─▶ observers: watchdog.seen, book.observe → timelines
    watchdog.loop ─emit (offline/online)─▶ outbox
    backend sink ─on_unknown─▶ tell_central ─▶ whatsapp sink.post (central: "empresa unknown")
    outbox.finished (send-test done) ─on_finished─chan─▶ sendtest.publish_receipts
                                                          ─▶ MQTT botonera-bridge/receipts/<id>
    ws receiver ─┬─append─▶ inbox stream ─▶ inbox.run lanes ─▶ commands.handle
    webhook ─────┘                                     ├─▶ whatsapp sink.post (replies)
    (receipts ─▶ timelines)                            └─▶ mqtt publish comandos/<empresa>
    escalation_loop ─▶ whatsapp sink.post;  book.run ─▶ Redis (board);  status model ◀─ all

``nursery.start`` where what follows needs the task ready: the Redis link (connected or
on the memory fallback), the HA lease loop, the receipts publisher (before any sink runs),
the status listener, the intake (WebSocket connected; router ready before MQTT is read).
``start_soon`` for the rest, which nothing waits on: the signal handler, systemd's
notifier, and the workers that consume a queue or a clock (watchdog, stream maintenance,
gauges, both sinks, inbox lanes, webhook, escalation, alarm book), each under
:func:`lifecycle.supervise`, which restarts it after a bug (its queue holds the work).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import trio

from . import USER_AGENT
from .config import Live, RedisSettings, Settings
from .health import Health
from .inbound.commands import CommandContext, escalation_loop, handle
from .inbound.inbox import GROUP as INBOX_GROUP
from .inbound.inbox import Inbox
from .inbound.webhook import Webhook
from .inbound.ws_receiver import receive
from .intake.mqtt import INTAKE_BUFFER, MqttClient, MqttMessage, open_mqtt
from .intake.router import Router
from .lifecycle import announce, freeze_startup_objects, shutdown_on_signal, supervise
from .messages import Event
from .metrics import Metrics
from .queues.hashes import RedisHashes
from .queues.link import RedisLink
from .queues.outbox import DeadLetters, Outbox, whatsapp_needs
from .queues.redis_client import Redis, open_redis_settings
from .queues.state import HashStore
from .queues.streams import DurableStream, Fence
from .sendtest import RECEIPT_BUFFER, Finished, publish_receipts, receipt_due
from .sinks import texts
from .sinks.backend import BackendSink, open_backend_clients
from .sinks.whatsapp import WhatsAppSink
from .sinks.whatsapp_api import open_sender
from .status.model import StatusModel
from .status.sdnotify import notify_loop
from .watch.alarms import AlarmBook
from .watch.receipts import Receipt, Timelines
from .watch.watchdog import Watchdog, inventory

log = logging.getLogger(__name__)


@asynccontextmanager
async def _maybe_redis(rs: RedisSettings) -> AsyncIterator[Redis | None]:
    if not rs.url:
        yield None
        return
    async with open_redis_settings(rs) as r:
        yield r


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


async def _publish(mqtt: MqttClient | None, topic: str, payload: bytes) -> None:  # commands
    if mqtt is None:
        raise RuntimeError("MQTT is disabled (--no-mqtt)")
    await mqtt.publish(topic, payload, qos=1)


async def run(settings: Settings, *, mqtt_enabled: bool = True, ws_enabled: bool = True) -> int:
    s, live = settings, Live(settings)
    prefix, cid, ws_on = s.redis.prefix, s.mqtt.client_id, ws_enabled and bool(s.websocket.url)
    metrics, health = Metrics(), Health(s.heartbeat.stall_timeout)
    metrics.memory_fallback_limit.set(s.redis.memory_limit)
    finished_send, finished_recv = trio.open_memory_channel[Finished](RECEIPT_BUFFER)
    async with AsyncExitStack() as stack:
        stack.callback(gc.unfreeze)  # see freeze_startup_objects
        redis = await stack.enter_async_context(_maybe_redis(s.redis))
        link = RedisLink(redis, metrics=metrics, health=health)
        hashes = RedisHashes(link) if redis is not None else None
        devices = HashStore(f"{prefix}:devices", hashes)
        alarms = HashStore(f"{prefix}:alarms", hashes)
        book = AlarmBook(alarms, escalation_after=s.escalation.after,
                         escalation_max=s.escalation.max,
                         configured=lambda e: live.current.empresa(e) is not None)  # fmt: skip
        timelines = Timelines(alarms, clock=book.clock)
        pool, http = await stack.enter_async_context(open_backend_clients(s.backend))
        sender = await stack.enter_async_context(open_sender(s.whatsapp))
        wa_sink = WhatsAppSink(s, sender, metrics=metrics, observer=timelines)
        dead = DeadLetters(link, f"{prefix}:dead", metrics, max_payload=s.mqtt.max_payload,
                           dead_max=s.redis.dead_max)  # fmt: skip
        outbox = Outbox(link, prefix, consumer=cid, memory_limit=s.redis.memory_limit, dead=dead,
                        reclaim_idle=s.redis.reclaim_idle,
                        on_finished=partial(receipt_due, finished_send if mqtt_enabled else None),
                        needed_by={"whatsapp": whatsapp_needs(wa_sink.recipients)})  # fmt: skip
        inbox_stream = DurableStream(link, f"{prefix}:inbox", (INBOX_GROUP,), consumer=cid,
                                     memory_limit=s.redis.memory_limit,
                                     dedup_prefix=f"{prefix}:seen:wa:")  # fmt: skip
        inbox = Inbox(inbox_stream, dead=dead, metrics=metrics)
        hb = s.heartbeat
        watchdog = Watchdog(timeout=hb.timeout, store=devices, emit=outbox.emit, metrics=metrics,
                            max_devices=hb.max_devices, forget_after=hb.forget_after,
                            inventory=inventory(s.empresas))  # fmt: skip
        observers: list[Callable[[Event], object]] = [
            watchdog.seen, lambda e: timelines.track(book.observe(e))
        ]  # fmt: skip

        def make_router(fence: Fence | None = None) -> Router:  # fence: an MQTT session lease
            return Router(live.current, outbox, metrics=metrics, observers=observers, fence=fence)

        async def on_receipt(receipt: Receipt) -> None:  # WhatsApp delivered/read statuses
            timelines.receipt(receipt)

        async def tell_central(event: Event) -> None:  # the backend does not know the empresa
            await wa_sink.post(live.current.central, texts.unknown_to_backend_text(event))

        backend_sink = BackendSink(s.backend, pool=pool, client=http, user_agent=USER_AGENT,
                                   metrics=metrics, on_unknown=tell_central,
                                   on_result=timelines.backend_result)  # fmt: skip
        replicas = None
        if s.ha.enabled and redis is not None:
            from .intake.ha import Replicas, take_over

            on_takeover = partial(take_over, streams=(outbox.stream, inbox_stream), book=book,
                                  alarms=alarms, timelines=timelines)  # fmt: skip
            replicas = Replicas(s, redis, make_router=make_router, on_takeover=on_takeover,
                                health=health, metrics=metrics)  # fmt: skip
        router = make_router(replicas.own if replicas is not None else None)
        mqtt = None
        if mqtt_enabled:
            gate = replicas.own_gate if replicas is not None else None
            mqtt = await stack.enter_async_context(
                open_mqtt(s.mqtt, health=health, metrics=metrics, gate=gate)
            )
        ctx = CommandContext(settings=s, book=book, devices=watchdog.devices, send=wa_sink.post,
                             publish=partial(_publish, mqtt), emit=outbox.emit, metrics=metrics,
                             timelines=timelines)  # fmt: skip
        status = StatusModel(
            settings=lambda: live.current, health=health, metrics=metrics, link=link,
            outbox=outbox, inbox=inbox_stream, inbox_group=INBOX_GROUP, dead=dead,
            devices=watchdog.devices_of, book=book, timelines=timelines,
            backend_error=lambda: backend_sink.last_error, websocket_enabled=ws_on,
            ha=replicas.snapshot if replicas is not None else None,
        )  # fmt: skip

        def on_reload(new: Settings) -> None:  # SIGHUP: what applies at once, see reload.py
            ctx.settings = new
            router.reconfigure(new)
            wa_sink.reconfigure(new)
            book.after, book.max = new.escalation.after, new.escalation.max
            watchdog.reconfigure(inventory(new.empresas))
            reconfigure_sender = getattr(sender, "reconfigure", None)
            if reconfigure_sender is not None:
                reconfigure_sender(new.whatsapp)

        live.subscribe(on_reload)
        webhook = _webhook(s, metrics)
        streams = (outbox.stream, inbox_stream)
        started = trio.Event()  # every task started: systemd READY=1 (broker or not)
        async with trio.open_nursery() as nursery:
            intake = trio.CancelScope()
            nursery.start_soon(shutdown_on_signal, nursery.cancel_scope, intake, s.shutdown_grace,
                               live, metrics, streams)  # fmt: skip
            await nursery.start(link.run)
            await alarms.load()
            book.reload()
            timelines.reload()
            if replicas is not None:
                await nursery.start(replicas.run, mqtt)
            if mqtt is not None:
                await nursery.start(publish_receipts, finished_recv, mqtt)
            if s.status.listen:
                from .status.server import serve_status  # hypercorn only when serving

                await nursery.start(partial(
                    serve_status, s.status.listen, metrics=metrics, health=health,
                    snapshot=status.snapshot, token=s.status.token, alarm=timelines.public,
                    webhook=webhook,
                ))  # fmt: skip
            await watchdog.load()

            def sup(name: str, fn: Callable[[], Awaitable[None]]) -> None:
                nursery.start_soon(supervise, name, health, fn)

            sup("watchdog", watchdog.loop)
            for stream in streams:
                sup(f"maintenance {stream.key}", stream.run_maintenance)
            sup("gauges", status.run)
            sup("backend sink", lambda: backend_sink.run(outbox.delivery("backend")))
            sup("whatsapp sink", lambda: wa_sink.run(outbox.delivery("whatsapp")))
            sup("inbox workers", lambda: inbox.run(partial(handle, ctx, metrics=metrics)))
            if webhook is not None:
                sup("webhook", lambda: webhook.run(inbox.append, on_receipt))
            sup("escalation", lambda: escalation_loop(ctx))
            sup("alarm book", partial(book.run, before_flush=[timelines.sync]))
            nursery.start_soon(notify_loop, health, started)

            async def intake_tasks(task_status: trio.TaskStatus[None]) -> None:
                with intake:
                    async with trio.open_nursery() as n:
                        if ws_on:
                            await n.start(partial(
                                receive, s.websocket.url, s.websocket.reconnect_delay,
                                inbox.append, on_receipt=on_receipt, health=health, metrics=metrics,
                            ))  # fmt: skip
                        if mqtt is not None:
                            send, recv = trio.open_memory_channel[MqttMessage](INTAKE_BUFFER)
                            await n.start(router.run, recv, mqtt)
                            started.set()  # the MQTT task retries the broker: no reason to wait
                            await n.start(mqtt.run, send)
                        started.set()
                        task_status.started()

            await nursery.start(intake_tasks)
            freeze_startup_objects()
            announce(s, mqtt=mqtt is not None, websocket=ws_on, redis_up=link.up)
    log.info("botonera-bridge stopped")
    return 0
