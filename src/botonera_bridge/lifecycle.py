"""The process's life around the wiring (app.py): supervised tasks, the start-up
announcement, the GC freeze after start-up, and the two-phase shutdown on
SIGTERM/SIGINT (and reload on SIGHUP)."""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import trio

from . import heap
from .backoff import delays
from .config import Live, Settings
from .health import Health
from .metrics import Metrics
from .queues.streams import DurableStream
from .redact import mask_url
from .reload import reload
from .status.sdnotify import stopping

log = logging.getLogger(__name__)


async def supervise(name: str, health: Health, fn: Callable[[], Awaitable[None]]) -> None:
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


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, config, tasks) out of the cyclic GC's
    reach. A full collection otherwise walks those ~50k objects and stalls the loop for
    20-40 ms every 10-20 s under load, the largest single latency spike measured. Garbage
    cycles are collected first, so nothing is leaked; the caller unfreezes on exit.
    Then the C heap's free pages go back to the kernel (see heap.trim)."""
    gc.collect()
    gc.freeze()
    heap.trim()


def announce(s: Settings, *, mqtt: bool, websocket: bool, redis_up: bool) -> None:
    """The "running" log line, and the warning when there is no Redis at all."""
    if not s.redis.url:
        log.warning(
            "redis.url is empty: queues live in memory only; MQTT messages are "
            "acknowledged only once delivered, and a crash loses nothing the broker "
            "still holds, but dead letters and panel state do not survive a restart"
        )
    log.info(
        "botonera-bridge running: mqtt=%s websocket=%s redis=%s status=%s",
        f"{s.mqtt.broker}:{s.mqtt.port}" if mqtt else "off",
        mask_url(s.websocket.url) if websocket else "off",
        "up" if redis_up else ("memory" if s.redis.url else "off"),
        s.status.listen or "off",
    )


async def shutdown_on_signal(
    everything: trio.CancelScope,
    intake: trio.CancelScope,
    grace: float,
    live: Live,
    metrics: Metrics,
    streams: Sequence[DurableStream],
) -> None:
    """SIGHUP reloads. SIGTERM/SIGINT stop intake, let the memory-held ``streams`` (the
    outbox first) drain for up to ``grace`` seconds, then cancel ``everything``:
    memory-held events are lost on exit, Redis-held ones are not."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP received: reloading the configuration")
                reload(live, metrics)
                continue
            log.info(
                "%s received: stopping intake, draining for up to %.0fs",
                signal.Signals(signum).name,
                grace,
            )
            stopping()
            intake.cancel()
            with trio.move_on_after(grace):
                # polled: shutdown only, and the sizes change in many places
                while any(st.memory_items for st in streams):  # noqa: ASYNC110
                    await trio.sleep(0.1)
            left = streams[0].memory_items
            if left:
                log.error(
                    "exiting with %d events only in memory "
                    "(unacknowledged: the broker redelivers them)",
                    left,
                )
            everything.cancel()
            return
