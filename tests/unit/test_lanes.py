"""Lanes: order per key, keys in parallel, bounded, a failure ends the run, clean per run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from botonera_bridge.lanes import Lanes

CEILING = 60.0  # virtual seconds: a hang fails fast


@asynccontextmanager
async def running(lanes: Lanes[str, int]) -> AsyncIterator[trio.Nursery]:
    """The lanes running in a nursery, cancelled when the block ends."""
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:
            await nursery.start(lanes.run)
            yield nursery
            nursery.cancel_scope.cancel()


class Recorder:
    """A handler that takes ``cost[key]`` virtual seconds per item and records when it ended."""

    def __init__(self, cost: dict[str, float] | None = None) -> None:
        self.cost = cost or {}
        self.done: list[tuple[str, int, float]] = []
        self.running: dict[str, int] = {}
        self.max_parallel_per_key = 0

    async def __call__(self, key: str, item: int) -> None:
        self.running[key] = self.running.get(key, 0) + 1
        self.max_parallel_per_key = max(self.max_parallel_per_key, self.running[key])
        await trio.sleep(self.cost.get(key, 1.0))
        self.running[key] -= 1
        self.done.append((key, item, trio.current_time()))


async def test_order_per_key_and_keys_in_parallel(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder({"a": 1.0, "b": 2.0})
    lanes: Lanes[str, int] = Lanes(rec, max_pending=100)
    async with running(lanes):
        t0 = trio.current_time()
        for i in range(3):
            lanes.put_nowait("a", i)
            lanes.put_nowait("b", i)
        assert lanes.pending == 6
        assert lanes.busy("a")
        assert lanes.busy("b")
        assert not lanes.busy("c")
        while lanes.pending:  # noqa: ASYNC110 - observed from outside
            await trio.sleep(0.5)
    assert [i for k, i, _ in rec.done if k == "a"] == [0, 1, 2]
    assert [i for k, i, _ in rec.done if k == "b"] == [0, 1, 2]
    # one at a time per key, both keys at once: exact virtual times
    assert [t - t0 for k, _, t in rec.done if k == "a"] == [1.0, 2.0, 3.0]
    assert [t - t0 for k, _, t in rec.done if k == "b"] == [2.0, 4.0, 6.0]
    assert rec.max_parallel_per_key == 1


async def test_one_worker_per_burst_not_per_item(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    lanes: Lanes[str, int] = Lanes(rec, max_pending=100)
    async with running(lanes):
        for i in range(10):
            lanes.put_nowait("a", i)
        await trio.sleep(5.5)
        lanes.put_nowait("a", 10)  # still busy: the same worker takes it
        await trio.sleep(20)
        stats = lanes.statistics()
        assert (stats.workers_started, stats.handled, stats.keys) == (1, 11, 0)
        lanes.put_nowait("a", 11)  # idle since: a new worker
        await trio.sleep(2)
        assert lanes.statistics().workers_started == 2


async def test_bound_blocks_the_producer_until_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder({"a": 1.0, "b": 1.5})
    lanes: Lanes[str, int] = Lanes(rec, max_pending=3)
    put_at: list[float] = []
    async with running(lanes):
        t0 = trio.current_time()
        assert await lanes.room() == 3
        lanes.put_nowait("a", 0)
        lanes.put_nowait("a", 1)
        lanes.put_nowait("b", 0)
        with pytest.raises(trio.WouldBlock):
            lanes.put_nowait("c", 0)
        for i in (2, 3):
            await lanes.put("a", i)
            put_at.append(trio.current_time() - t0)
            assert lanes.pending <= 3
        while lanes.pending:  # noqa: ASYNC110 - observed from outside
            await trio.sleep(0.5)
    assert put_at == [1.0, 1.5]  # each waited for one item (a0, then b0) to finish
    assert [i for k, i, _ in rec.done if k == "a"] == [0, 1, 2, 3]


async def test_a_failure_ends_the_run_and_leaves_no_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started = 0

    async def handle(key: str, item: int) -> None:
        nonlocal started
        started += 1
        await trio.sleep(1 if key == "a" else 1.5)
        if item == 1:
            raise RuntimeError("a bug")

    lanes: Lanes[str, int] = Lanes(handle, max_pending=10)
    with trio.fail_after(CEILING):
        with pytest.RaisesGroup(
            pytest.RaisesExc(RuntimeError, match="a bug"), flatten_subgroups=True
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(lanes.run)
                for i in range(3):
                    lanes.put_nowait("a", i)
                    lanes.put_nowait("b", i + 10)  # cancelled with the run
        assert lanes.pending == 0
        assert lanes.statistics().keys == 0
        with pytest.raises(RuntimeError, match="not running"):
            lanes.put_nowait("a", 5)
        # restarted: a clean run, the key's lane works again
        async with trio.open_nursery() as nursery:
            await nursery.start(lanes.run)
            lanes.put_nowait("a", 7)
            await trio.sleep(2)
            stats = lanes.statistics()
            assert (stats.pending, stats.handled, stats.keys) == (0, 1, 0)
            nursery.cancel_scope.cancel()
    assert started == 2 + 2 + 1  # a0, a1, b10, b11 (cancelled) before the crash; then a7


async def test_cancelling_the_run_forgets_everything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder({"a": 100.0})
    lanes: Lanes[str, int] = Lanes(rec, max_pending=2)
    async with running(lanes) as nursery:
        lanes.put_nowait("a", 0)
        lanes.put_nowait("a", 1)
        nursery.start_soon(lanes.put, "a", 2)  # waits for room
        await trio.sleep(1)
    assert lanes.statistics().pending == 0
    assert not lanes.busy("a")
    assert rec.done == []
    assert await lanes.room() == 2


async def test_max_workers_caps_tasks_and_waiting_lanes_go_in_arrival_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder()  # 1 virtual second per item
    lanes: Lanes[str, int] = Lanes(rec, max_pending=1000, max_workers=2)
    async with running(lanes):
        t0 = trio.current_time()
        for key in ("a", "b", "c", "d"):
            lanes.put_nowait(key, 0)
        lanes.put_nowait("c", 1)  # a waiting lane still collects its items in order
        stats = lanes.statistics()
        assert stats.workers_started == 2
        assert stats.waiting == 2
        while lanes.pending:  # noqa: ASYNC110 - observed from outside
            await trio.sleep(0.5)
        stats = lanes.statistics()
    # a and b first; then c (both items, in order) and d take over the two workers
    assert sorted((t - t0, k, i) for k, i, t in rec.done) == [
        (1.0, "a", 0), (1.0, "b", 0), (2.0, "c", 0), (2.0, "d", 0), (3.0, "c", 1),
    ]  # fmt: skip
    assert stats.workers_started == 2  # the two workers were reused, never a third
    assert stats.waiting == 0
    assert stats.keys == 0


def parking(keep_idle: int, max_workers: int | None = None) -> tuple[Recorder, Lanes[str, int]]:
    """Lanes that keep idle workers parked, over a Recorder (1 virtual second per item)."""
    rec = Recorder()
    return rec, Lanes(rec, max_pending=100, max_workers=max_workers, keep_idle=keep_idle)


async def test_idle_workers_stay_parked_and_take_the_next_new_lanes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec, lanes = parking(keep_idle=1)
    async with running(lanes):
        lanes.put_nowait("a", 0)
        lanes.put_nowait("b", 0)
        await trio.sleep(2)  # both done: one worker parks, the other (over keep_idle) ends
        assert lanes.statistics().workers_started == 2
        for i in range(3):  # a trickle over one key: the parked worker, every time
            lanes.put_nowait("c", i)
            await trio.sleep(2)
        assert lanes.statistics().workers_started == 2
        lanes.put_nowait("d", 0)  # takes the parked worker
        lanes.put_nowait("d", 1)  # same lane, same worker, in order
        lanes.put_nowait("e", 0)  # none parked now: a new task
        while lanes.pending:  # noqa: ASYNC110 - observed from outside
            await trio.sleep(0.5)
        stats = lanes.statistics()
    assert stats.workers_started == 3
    assert stats.handled == 8
    assert [i for k, i, _ in rec.done if k == "c"] == [0, 1, 2]
    assert [i for k, i, _ in rec.done if k == "d"] == [0, 1]
    assert rec.max_parallel_per_key == 1


async def test_parked_workers_count_against_max_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, lanes = parking(keep_idle=2, max_workers=2)
    async with running(lanes):
        lanes.put_nowait("a", 0)
        lanes.put_nowait("b", 0)
        await trio.sleep(2)  # two parked workers, the cap
        for key in ("c", "d", "e"):
            lanes.put_nowait(key, 0)
        stats = lanes.statistics()
        assert (stats.workers_started, stats.waiting) == (2, 1)  # e waits for a worker
        while lanes.pending:  # noqa: ASYNC110 - observed from outside
            await trio.sleep(0.5)
        stats = lanes.statistics()
    assert (stats.workers_started, stats.handled, stats.waiting) == (2, 5, 0)
