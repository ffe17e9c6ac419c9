"""Micro-benchmark of the per-key lanes (src/botonera_bridge/lanes.py): CPU µs per item.

Two loads, each with a handler that checkpoints once (as a POST awaits its answer):
- burst: N items over K keys put as fast as the bound lets them (a backlog drain);
- steady: one item at a time over K keys, the next put once the last is handled (the
  steady flow of issue 14 at 500 msg/s, where a lane empties between items and the
  old code started a task per item); no timers, so the figure is scheduling alone.

Variants: ``old`` is the inline pattern the backend sink and the inbox had before the
helper (a dict of deques, a task per lane while it has items, a counter and an event
for the bound), ``lanes`` the helper.

    .venv/bin/python bench/lanes.py [--items 100000] [--keys 8] [--steady 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from botonera_bridge.lanes import Lanes

MAX_PENDING = 5000
READ_BATCH = 200

Handler = Callable[[str, int], Awaitable[None]]


class OldLanes:
    """The pre-helper pattern (sinks/backend.py and inbox.py at b7e87f5), reduced."""

    def __init__(self, handle: Handler, nursery: trio.Nursery) -> None:
        self.handle = handle
        self.nursery = nursery
        self.lanes: dict[str, deque[int]] = {}
        self.pending = 0
        self.room_event = trio.Event()
        self.started = 0

    async def room(self) -> int:
        while self.pending >= MAX_PENDING:
            self.room_event = trio.Event()
            await self.room_event.wait()
        return MAX_PENDING - self.pending

    def put_nowait(self, key: str, item: int) -> None:
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = deque()
            self.started += 1
            self.nursery.start_soon(self.lane, key, lane)
        lane.append(item)
        self.pending += 1

    async def lane(self, key: str, queue: deque[int]) -> None:
        try:
            while queue:
                await self.handle(key, queue[0])
                queue.popleft()
                self.pending -= 1
                self.room_event.set()
        finally:
            del self.lanes[key]


async def _handler(key: str, item: int) -> None:
    await trio.lowlevel.checkpoint()


async def _drive(variant: str, items: int, keys: int, steady: bool) -> tuple[float, int]:
    """CPU seconds for ``items`` items, and how many worker tasks were started."""
    names = [f"empresa{k}" for k in range(keys)]
    done = trio.Event()
    left = items
    handled = trio.Event()  # steady load: the producer waits for each item

    async def handle(key: str, item: int) -> None:
        nonlocal left, handled
        await _handler(key, item)
        left -= 1
        handled.set()
        if not left:
            done.set()

    async with trio.open_nursery() as nursery:
        lanes: OldLanes | Lanes[str, int]
        if variant == "old":
            lanes = OldLanes(handle, nursery)
        else:
            lanes = Lanes(handle, max_pending=MAX_PENDING)
            await nursery.start(lanes.run)
        cpu0 = time.process_time()
        i = 0
        while i < items:
            if steady:
                handled = trio.Event()
                lanes.put_nowait(names[i % keys], i)
                i += 1
                await handled.wait()  # the lane is empty again before the next item
                continue
            room = await lanes.room()
            for _ in range(min(READ_BATCH, room, items - i)):
                lanes.put_nowait(names[i % keys], i)
                i += 1
            await trio.lowlevel.checkpoint()  # a read from the stream awaits
        await done.wait()
        cpu = time.process_time() - cpu0
        started = (
            lanes.started if isinstance(lanes, OldLanes) else lanes.statistics().workers_started
        )
        nursery.cancel_scope.cancel()
    return cpu, started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000, help="items in the burst load")
    ap.add_argument("--keys", type=int, default=8)
    ap.add_argument("--steady", type=int, default=20_000, help="items in the steady load")
    ap.add_argument("--runs", type=int, default=3, help="runs per variant; the median is shown")
    args = ap.parse_args()
    variants = ("old", "lanes")
    loads = {"burst": (args.items, False), "steady": (args.steady, True)}
    print(f"keys={args.keys} burst={args.items} steady={args.steady}")
    print(f"{'load':8} {'variant':14} {'µs/item':>8} {'workers started':>16}")
    for load, (n, steady) in loads.items():
        for variant in variants:
            runs = [trio.run(_drive, variant, n, args.keys, steady) for _ in range(args.runs)]
            cpu = statistics.median(r[0] for r in runs)
            print(f"{load:8} {variant:14} {cpu / n * 1e6:8.2f} {runs[0][1]:16d}")


if __name__ == "__main__":
    main()
