"""Whether Redis is usable right now, shared by every queue and store.

Any Redis failure marks the link down (queues switch to memory); a probe task
pings with capped backoff and, once Redis answers, runs each registered
recovery hook (move memory contents into the streams) before marking it up.
While up it pings every ``PING_EVERY`` seconds, so a Redis that froze while
nothing was being written is noticed within about ``PING_EVERY + redis.timeout``.
A command past its deadline, or an error reply to a write, counts as a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from ..backoff import delays
from ..errors import RedisError
from ..health import Health
from ..metrics import Metrics
from .redis_client import Redis

log = logging.getLogger(__name__)

PING_EVERY: Final = 1.0  # seconds between liveness PINGs while Redis is up


class RedisLink:
    def __init__(
        self, redis: Redis | None, *, metrics: Metrics | None = None, health: Health | None = None
    ) -> None:
        self.redis = redis
        self._metrics = metrics
        self._health = health
        self.up = False
        self.changed = trio.Event()  # replaced each time `up` flips
        self._went_down = trio.Event()
        self._recovery: list[Callable[[], Awaitable[None]]] = []
        self._on_down: list[Callable[[], None]] = []
        self._on_change: list[Callable[[], None]] = []
        self._after_recovery: list[Callable[[], None]] = []
        self._hook_error = ""  # the last recovery hook failure logged
        self.last_error = "not connected yet" if redis else "memory only (redis.url empty)"
        if health is not None and redis is not None:
            health.require("redis")  # /readyz names it while the queues run on memory
            health.set("redis", False, self.last_error)
        self._report()

    def on_recovery(self, hook: Callable[[], Awaitable[None]]) -> None:
        self._recovery.append(hook)

    def on_down(self, hook: Callable[[], None]) -> None:
        """Called (synchronously) each time the link goes down."""
        self._on_down.append(hook)

    def after_recovery(self, hook: Callable[[], None]) -> None:
        """Called (synchronously) after each recovery attempt, successful or not."""
        self._after_recovery.append(hook)

    def on_change(self, hook: Callable[[], None]) -> None:
        """Called (synchronously) each time ``up`` flips, after the flip."""
        self._on_change.append(hook)

    def down(self, exc: BaseException) -> None:
        self.last_error = str(exc)
        if not self.up:
            return
        self.up = False
        log.warning(
            "Redis unavailable (%s): queues fall back to memory; "
            "MQTT acknowledgements wait until messages are delivered",
            exc,
        )
        self._flip()
        self._went_down.set()
        for hook in self._on_down:
            hook()

    def _flip(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        self._report()
        for hook in self._on_change:
            hook()

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.redis_connected.set(1 if self.up else 0)
            self._metrics.memory_fallback.set(0 if self.up else 1)
        if self._health is not None and self.redis is not None:
            why = f"down, queues on the memory fallback: {self.last_error}"
            self._health.set("redis", self.up, why)

    async def _recover(self) -> None:
        assert self.redis is not None
        try:
            await self.redis.execute("PING")
            try:
                for hook in self._recovery:
                    await hook()
            except RedisError as exc:  # Redis answers, yet refuses the move back: say so, once
                if str(exc) != self._hook_error:
                    self._hook_error = str(exc)
                    log.warning("Redis answers, but moving memory queues back failed (%s)", exc)
                raise
            self._hook_error = ""
            self.up = True
            self.last_error = ""
            self._flip()
        finally:
            for settled in self._after_recovery:
                settled()

    async def connect(self) -> None:
        """For short-lived tools: require Redis now (raises RedisError), no fallback."""
        assert self.redis is not None
        await self.redis.execute("PING")
        self.up = True
        self._report()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect at start (without waiting forever), then keep probing while down."""
        if self.redis is None:
            task_status.started()
            await trio.sleep_forever()
        first = True
        while True:
            for delay in delays(0.5, 2.0):  # a PING every <= 2 s is cheap; recover fast
                try:
                    await self._recover()
                except RedisError as exc:
                    self.last_error = str(exc)
                    self._report()
                    if first:
                        log.warning("Redis unavailable at start (%s): running on memory", exc)
                        task_status.started()
                        first = False
                    await trio.sleep(delay)
                    continue
                if first:
                    task_status.started()
                    first = False
                else:
                    log.warning(
                        "Redis is back (%s): memory queues moved into the streams",
                        self.redis.address,
                    )
                break
            self._went_down = trio.Event()
            await self._watch()

    async def _watch(self) -> None:
        """While up: PING now and then; return once the link went down (any user's failure)."""
        assert self.redis is not None
        while not self._went_down.is_set():
            with trio.move_on_after(PING_EVERY):
                await self._went_down.wait()
                return
            try:
                await self.redis.execute("PING")
            except RedisError as exc:
                self.down(exc)
