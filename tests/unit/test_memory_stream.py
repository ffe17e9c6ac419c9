"""The bounded in-memory stream, and the switch-over on it while Redis is away (memory
only: ``redis.url`` empty). No sockets; waits under ``autojump_clock``."""

from __future__ import annotations

import trio
import trio.testing

from botonera_bridge.queues.base import Origin, Stream
from botonera_bridge.queues.link import RedisLink
from botonera_bridge.queues.memory_stream import MemoryStream
from botonera_bridge.queues.streams import DurableStream

GROUPS = ("a", "b")


def _memory(limit: int = 10) -> MemoryStream:
    return MemoryStream("t", GROUPS, limit=limit)


def test_memory_stream_is_a_stream() -> None:
    stream: Stream = _memory()
    assert stream.key == "t"


async def test_items_go_to_every_group_and_are_safe_once_all_finished() -> None:
    mem = _memory()
    receipts = [mem.put(d, frozenset()) for d in (b"1", b"2")]
    a = mem.take("a", 10)
    assert [(i.data, i.origin) for i in a] == [(b"1", Origin.MEMORY), (b"2", Origin.MEMORY)]
    assert mem.inflight("a") == 2
    await mem.ack("a", [i.id for i in a])
    assert not any(r.safe for r in receipts)  # b has not finished them
    assert (mem.unfinished("a"), mem.unfinished("b")) == (0, 2)
    b = mem.take("b", 1)
    await mem.ack("b", [b[0].id])
    assert [r.safe for r in receipts] == [True, False]
    assert len(mem) == 1


def test_a_skipped_group_never_sees_the_item_and_all_skipped_is_safe_at_once() -> None:
    mem = _memory()
    only_a = mem.put(b"x", frozenset({"b"}))
    nobody = mem.put(b"y", frozenset(GROUPS))
    assert mem.take("b", 10) == []
    assert [i.data for i in mem.take("a", 10)] == [b"x"]
    assert not only_a.safe
    assert nobody.safe
    assert len(mem) == 1


async def test_release_hands_out_again_in_order_before_newer_items() -> None:
    mem = _memory()
    for d in (b"1", b"2", b"3"):
        mem.put(d, frozenset())
    first = mem.take("a", 2)
    await mem.ack("a", [first[1].id])  # "1" is left unacknowledged
    mem.put(b"4", frozenset())
    assert mem.release("a") == 1
    assert mem.inflight("a") == 0
    assert [i.data for i in mem.take("a", 10)] == [b"1", b"3", b"4"]


async def test_moved_items_are_safe_gone_and_their_late_ack_stays_here() -> None:
    mem = _memory()
    receipts = [mem.put(d, frozenset()) for d in (b"1", b"2")]
    (handed,) = mem.take("a", 1)
    backlog = mem.backlog()
    assert [(m.data, m.done_by) for m in backlog] == [(b"1", frozenset()), (b"2", frozenset())]
    mem.moved([m.id for m in backlog])
    assert all(r.safe for r in receipts)
    assert (len(mem), mem.inflight("a"), mem.take("a", 10), mem.take("b", 10)) == (0, 0, [], [])
    # the sink finishes what it was handed before the move: not an id of the Redis stream
    assert mem.active
    assert mem.owns("a", handed.id)
    await mem.ack("a", [handed.id])
    assert not mem.active


async def test_wait_room_until_an_item_is_finished(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mem = _memory(limit=1)
    mem.put(b"1", frozenset({"b"}))
    assert mem.room == 0
    waited = []

    async def waiter() -> None:
        await mem.wait_room()
        waited.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(7)
        (item,) = mem.take("a", 1)
        await mem.ack("a", [item.id])
    assert waited == [7]
    assert mem.room == 1


async def test_read_waits_for_a_put_or_gives_up_after_block_ms(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mem = _memory()
    assert await mem.read("a", 10, block_ms=250) == []
    assert trio.current_time() == 0.25
    async with trio.open_nursery() as nursery:

        async def put_later() -> None:
            await trio.sleep(1)
            mem.put(b"late", frozenset())
            mem.wake()

        nursery.start_soon(put_later)
        got = await mem.read("a", 10, block_ms=5000)
    assert [i.data for i in got] == [b"late"]
    assert trio.current_time() == 1.25


# -- the switch-over on memory only (no Redis configured) ------------------------------------
def _durable(limit: int = 3) -> DurableStream:
    return DurableStream(RedisLink(None), "t", GROUPS, consumer="c", memory_limit=limit)


async def test_memory_full_append_waits_for_room_then_keeps_the_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = _durable(limit=3)
    first = await stream.append([(b"1", ""), (b"2", ""), (b"3", "")])
    assert stream.memory_items == 3
    done_at = []

    async def fifth_and_sixth() -> None:
        await stream.append([(b"4", ""), (b"5", "")])
        done_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fifth_and_sixth)
        await trio.sleep(10)
        assert done_at == []  # upstream acknowledgements pause: nothing dropped
        for g in GROUPS:
            (item,) = await stream.read(g, 1)
            await stream.ack(g, [item.id])
        assert first[0].safe
        await trio.sleep(1)
        assert done_at == []  # room for one of the two only
        for g in GROUPS:
            (item,) = await stream.read(g, 1)
            await stream.ack(g, [item.id])
    assert done_at == [11]
    for g in GROUPS:
        got = await stream.read(g, 10)
        assert [i.data for i in got] == [b"3", b"4", b"5"]
    assert stream.appended == 5


async def test_memory_only_redelivery_dedup_skips_and_counts() -> None:
    stream = _durable(limit=10)
    await stream.append([(b"x", "k1"), (b"y", "")], skips=[frozenset(), frozenset({"b"})])
    (again,) = await stream.append([(b"x-again", "?k1")])
    assert again.safe  # seen: dropped
    assert stream.appended == 2
    assert stream.skipped == {"b": 1}
    assert [i.data for i in await stream.read("a", 10)] == [b"x", b"y"]
    assert [i.data for i in await stream.read("b", 10)] == [b"x"]
    assert (stream.inflight("a"), await stream.depth("a"), stream.memory_depth("b")) == (2, 2, 1)


async def test_memory_only_reader_waits_for_an_append(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = _durable()
    got = []

    async def reader() -> None:
        got.extend(await stream.read("a", 10, block_ms=100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(30)  # no Redis to poll: the reader only wakes for an append
        assert got == []
        await stream.append([(b"now", "")])
    assert [i.data for i in got] == [b"now"]
    assert trio.current_time() == 30
