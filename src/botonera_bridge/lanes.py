"""Per-key lanes: the items of one key are handled one at a time, in order; keys in parallel.

The one mechanism behind the backend sink (a lane per empresa), the inbox (a lane per
sender) and the WhatsApp sink (a worker per number). A lane is a deque drained by one
worker task, started when the key gets its first item and ended when the deque is
empty: a burst over a few keys costs a task per key, never a task per item, and an
idle key costs nothing. With ``keep_idle``, up to that many workers whose lane emptied
stay parked (no timer: a timed wait costs more than a new task, measured in
``bench/lanes.py``) and the next new lane, of any key, wakes one instead of starting a
task: a steady trickle, where every lane empties between items, then costs a wake-up
per item, not a task.

``max_workers`` caps the worker tasks: a lane that gets items while that many run waits
as data (no parked task) and the first worker whose lane empties takes it over, oldest
first. Thousands of keys then cost a deque each, not a task each (and the GC scans of
thousands of parked tasks).

Bounded: at most ``max_pending`` items are held over all lanes (queued or being
handled). :meth:`Lanes.room` waits until something fits and says how much, so a
producer reads only what fits and the back-pressure reaches the stream it reads from;
:meth:`Lanes.put_nowait` past the bound raises :class:`trio.WouldBlock`, and
:meth:`Lanes.put` waits. ``max_pending=None`` is for owners whose keys and items are
bounded elsewhere (the WhatsApp sink: numbers come from the configuration).

A handler handles its own failures (the inbox dead-letters, the sinks retry): an
exception that escapes it ends :meth:`Lanes.run`, every lane with it, and the owner's
supervisor restarts it from a clean state (the backend sink then reads the
unacknowledged entries again).

State belongs to one run: :meth:`Lanes.run` starts empty and forgets everything when
it ends (cancelled or crashed), so a restarted owner never feeds a lane nobody drains.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LaneStatistics:
    keys: int  # lanes with an item queued or being handled
    pending: int  # items queued or being handled, over all lanes
    max_pending: int  # the bound; 0 when unbounded
    handled: int  # items finished since the run started
    workers_started: int  # worker tasks started since the run started
    waiting: int = 0  # lanes with items waiting for a worker (max_workers reached)


class Lanes(Generic[K, T]):
    """Run ``handle(key, item)`` for every item put, in order per key; see the module docstring."""

    def __init__(
        self,
        handle: Callable[[K, T], Awaitable[object]],
        *,
        max_pending: int | None,
        max_workers: int | None = None,
        keep_idle: int = 0,
    ) -> None:
        if max_pending is not None and max_pending < 1:
            raise ValueError("max_pending must be at least 1 (or None: unbounded)")
        self._handle = handle
        self._max = max_pending or 0
        self._max_workers = max_workers or 0
        self._workers = 0
        self._waiting: deque[K] = deque()  # keys with items and no worker yet
        self._keep_idle = keep_idle
        self._parked: deque[_Parked[K, T]] = deque()  # idle workers (counted in _workers)
        self._nursery: trio.Nursery | None = None
        self._lanes: dict[K, deque[T]] = {}
        self._pending = 0
        self._room = trio.Event()
        self._handled = self._started = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the lane workers until cancelled; an unhandled item error ends it."""
        if self._nursery is not None:
            raise RuntimeError("these lanes are already running")
        self._reset()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._reset()

    def _reset(self) -> None:
        self._lanes = {}
        self._pending = 0
        self._handled = self._started = 0
        self._workers = 0
        self._waiting = deque()
        self._parked = deque()
        self._room.set()  # a producer waiting for room in the old run must not hang

    # -- producing ----------------------------------------------------------------------

    def put_nowait(self, key: K, item: T) -> None:
        """Queue ``item`` behind the others of ``key``; WouldBlock when the lanes are full."""
        if self._max and self._pending >= self._max:
            raise trio.WouldBlock
        queue = self._lanes.get(key)
        if queue is None:
            if self._nursery is None:
                raise RuntimeError("the lanes are not running")
            queue = self._lanes[key] = deque()
            if self._parked:
                parked = self._parked.popleft()
                parked.lane = (key, queue)
                parked.event.set()
            elif self._max_workers and self._workers >= self._max_workers:
                self._waiting.append(key)  # a worker takes it when its own lane is empty
            else:
                self._workers += 1
                self._started += 1
                self._nursery.start_soon(self._worker, key, queue)
        queue.append(item)
        self._pending += 1

    async def put(self, key: K, item: T) -> None:
        """:meth:`put_nowait`, waiting for room first."""
        await self.room()
        self.put_nowait(key, item)

    async def room(self) -> int:
        """Wait until at least one item fits; return how many fit now."""
        while self._max and self._pending >= self._max:
            self._room = trio.Event()
            await self._room.wait()
        return self._max - self._pending if self._max else sys.maxsize

    # -- reading ------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return self._pending

    def busy(self, key: K) -> bool:
        """Whether ``key`` has an item queued or being handled."""
        return bool(self._lanes.get(key))

    def statistics(self) -> LaneStatistics:
        return LaneStatistics(
            keys=len(self._lanes),
            pending=self._pending,
            max_pending=self._max,
            handled=self._handled,
            workers_started=self._started,
            waiting=len(self._waiting),
        )

    # -- the worker ---------------------------------------------------------------------

    async def _worker(self, key: K, queue: deque[T]) -> None:
        handle = self._handle
        while True:
            try:
                while queue:
                    item = queue[0]  # stays queued while handled: counted as pending
                    await handle(key, item)
                    queue.popleft()
                    self._handled += 1
                    self._pending -= 1
                    if self._max and self._pending < self._max:
                        self._room.set()
            finally:
                # no checkpoint between the last look at the deque and this: a put that
                # came meanwhile found this lane, and its item was handled above
                if self._lanes.get(key) is queue:
                    del self._lanes[key]
            if self._waiting:
                key = self._waiting.popleft()  # this worker's place goes to the oldest one
                queue = self._lanes[key]
            elif len(self._parked) < self._keep_idle:
                parked: _Parked[K, T] = _Parked()  # not _Parked[K, T](): typing costs 1 us
                self._parked.append(parked)
                await parked.event.wait()  # cancelled with the run
                key, queue = parked.lane
            else:
                self._workers -= 1
                return


class _Parked(Generic[K, T]):
    """An idle worker, waiting for the next new lane (set by :meth:`Lanes.put_nowait`)."""

    __slots__ = ("event", "lane")
    lane: tuple[K, deque[T]]  # set before the event

    def __init__(self) -> None:
        self.event = trio.Event()
