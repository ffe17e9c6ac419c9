"""DurableStream against a real redis-server: groups, fallback, recovery, NOGROUP, trim."""

from __future__ import annotations

import trio

from botonera_bridge.errors import RedisError
from botonera_bridge.metrics import Metrics
from botonera_bridge.queues.link import RedisLink
from botonera_bridge.queues.redis_client import open_redis
from botonera_bridge.queues.streams import MAX_DELIVERIES, DurableStream, Origin

GROUPS = ("a", "b")


async def _stream(redis, **kw):
    link = RedisLink(redis, metrics=Metrics())
    stream = DurableStream(
        link, "t:stream", GROUPS, consumer="c1", memory_limit=kw.pop("memory_limit", 100), **kw
    )
    return link, stream


async def _drain(stream, group, n):
    got = []
    with trio.fail_after(10):
        while len(got) < n:
            items = await stream.read(group, n - len(got), block_ms=100)
            got += items
    return got


async def test_append_read_ack_groups_independent(redis_server):
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis)
        await n.start(link.run)
        assert link.up
        receipts = await stream.append([(f"m{i}".encode(), "") for i in range(50)])
        assert all(r.safe for r in receipts)
        a = await _drain(stream, "a", 50)
        assert [i.data for i in a] == [f"m{i}".encode() for i in range(50)]
        await stream.ack("a", [i.id for i in a])
        assert await stream.depth("a") == 0
        assert await stream.depth("b") == 50
        b = await _drain(stream, "b", 50)
        assert [i.data for i in b] == [i.data for i in a]
        n.cancel_scope.cancel()


async def test_dedup_key_drops_second_copy(redis_server):
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis, dedup_prefix="t:seen:")
        await n.start(link.run)
        await stream.append([(b"x", "k1"), (b"y", "k2")])
        # a fresh stream object (as after a restart) still sees the Redis-side key
        stream2 = DurableStream(
            link, "t:stream", GROUPS, consumer="c2", memory_limit=10, dedup_prefix="t:seen:"
        )
        await stream2.append([(b"x-again", "?k1"), (b"z", "")])
        # a fresh message reusing a key (a panel rebooted, seq restarted) is never dropped
        await stream2.append([(b"y-new", "k2"), (b"w", "?k9")])
        got = await _drain(stream, "a", 5)
        assert [i.data for i in got] == [b"x", b"y", b"z", b"y-new", b"w"]
        n.cancel_scope.cancel()


async def test_memory_fallback_and_recovery_in_order(redis_server):
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis)
        await n.start(link.run)
        await stream.append([(b"before", "")])
        redis_server.kill()
        receipts = await stream.append([(f"mem{i}".encode(), "") for i in range(5)])
        assert not link.up
        assert not any(r.safe for r in receipts)
        # group a delivers two of them from memory while Redis is away
        got = await _drain(stream, "a", 2)
        assert [i.data for i in got] == [b"mem0", b"mem1"]
        await stream.ack("a", [i.id for i in got])
        assert not receipts[0].safe  # b has not finished it
        redis_server.start()
        with trio.fail_after(15):
            while not link.up:
                await link.changed.wait()
        assert all(r.safe for r in receipts)  # moved into the stream: safe
        rest_a = await _drain(stream, "a", 2)  # "before" and mem2.. for a
        assert rest_a[0].data == b"before"
        more = rest_a[1:] + await _drain(stream, "a", 3 - len(rest_a[1:]))
        assert [i.data for i in more] == [b"mem2", b"mem3", b"mem4"]
        b = await _drain(stream, "b", 6)
        assert [i.data for i in b] == [b"before"] + [f"mem{i}".encode() for i in range(5)]
        n.cancel_scope.cancel()


async def test_memory_full_blocks_append_until_space(redis_server):
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis, memory_limit=3)
        await n.start(link.run)
        redis_server.kill()
        await stream.append([(b"1", ""), (b"2", ""), (b"3", "")])
        done = trio.Event()

        async def fourth():
            await stream.append([(b"4", "")])
            done.set()

        n.start_soon(fourth)
        await trio.sleep(0.3)
        assert not done.is_set()
        for g in GROUPS:
            got = await _drain(stream, g, 1)
            await stream.ack(g, [got[0].id])
        with trio.fail_after(5):
            await done.wait()
        n.cancel_scope.cancel()


async def test_nogroup_after_empty_restart_recreates(redis_server, caplog):
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis)
        await n.start(link.run)
        await stream.append([(b"old", "")])
        redis_server.kill()
        redis_server.wipe()
        redis_server.start()
        with trio.fail_after(15):
            while True:
                try:
                    await stream.append([(b"new", "")])
                    if link.up:
                        break
                except RedisError:  # Redis still starting: the loop tries again
                    await trio.sleep(0.1)
                    continue
                await trio.sleep(0.1)
        got = await _drain(stream, "a", 1)
        assert got[-1].data == b"new"
        assert "possible data loss" in caplog.text
        n.cancel_scope.cancel()


async def test_trim_keeps_unacknowledged(redis_server):
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis)
        await n.start(link.run)
        await stream.append([(f"{i}".encode(), "") for i in range(10)])
        a = await _drain(stream, "a", 10)
        await stream.ack("a", [i.id for i in a])
        b = await _drain(stream, "b", 10)
        await stream.ack("b", [i.id for i in b[:4]])
        await stream.maintain()
        left = await redis.execute("XLEN", "t:stream")
        assert 6 <= left < 10
        rng = await redis.execute("XRANGE", "t:stream", "-", "+")
        assert {e[0].decode() for e in rng} >= {i.id for i in b[4:]}
        n.cancel_scope.cancel()


async def test_reclaim_from_dead_consumer_and_own_pending(redis_server):
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, s1 = await _stream(redis)
        await n.start(link.run)
        await s1.append([(b"p1", ""), (b"p2", "")])
        taken = await _drain(s1, "a", 2)
        assert len(taken) == 2  # c1 dies without acking
        # same consumer name after a restart: its own pending entries come first
        link2 = RedisLink(redis)
        await link2.connect()
        same = DurableStream(link2, "t:stream", GROUPS, consumer="c1", memory_limit=10)
        again = await _drain(same, "a", 2)
        assert [i.data for i in again] == [b"p1", b"p2"]
        # another replica reclaims what an idle consumer holds
        other = DurableStream(
            link2, "t:stream", GROUPS, consumer="c2", memory_limit=10, reclaim_idle_ms=100
        )
        await trio.sleep(0.3)
        await other.maintain()
        got = await _drain(other, "a", 2)
        assert sorted(i.data for i in got) == [b"p1", b"p2"]
        n.cancel_scope.cancel()


async def test_entry_delivered_too_often_goes_to_on_poison(redis_server):
    poisoned = []

    async def on_poison(group, item, deliveries):
        poisoned.append((group, item.data, deliveries))

    async with open_redis(redis_server.url) as redis:
        link = RedisLink(redis)
        await link.connect()
        first = DurableStream(link, "t:p", GROUPS, consumer="c1", memory_limit=10)
        await first.append([(b"crashes-us", "")])
        # every restart (same consumer name) re-reads its pending entry and dies again
        for _ in range(MAX_DELIVERIES):
            again = DurableStream(
                link, "t:p", GROUPS, consumer="c1", memory_limit=10, on_poison=on_poison
            )
            assert [i.data for i in await _drain(again, "a", 1)] == [b"crashes-us"]
        last = DurableStream(
            link, "t:p", GROUPS, consumer="c1", memory_limit=10, on_poison=on_poison
        )
        with trio.move_on_after(0.5):
            await last.read("a", 10, block_ms=100)
        assert poisoned == [("a", b"crashes-us", MAX_DELIVERIES + 1)]
        pending = await redis.execute("XPENDING", "t:p", "a")
        assert pending[0] == 0


async def _commands(redis) -> dict[str, int]:
    info = (await redis.execute("INFO", "commandstats")).decode()
    out = {}
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            out[name[8:]] = int(rest.split(",")[0].split("=")[1])
    return out


async def test_waiting_reader_is_handed_appends_and_acks_go_out_batched(redis_server):
    """The append's own round trip reads for a waiting reader (its poll is 5 s away, so the
    entry can only come from the append); acks are deferred while maintenance runs."""
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis)
        await n.start(link.run)
        await stream.append([(b"first", "")])
        (taken,) = await _drain(stream, "a", 1)  # now caught up
        first = taken.id
        got: list = []
        arrived = trio.Event()

        async def reader():
            got.extend(await stream.read("a", 10, block_ms=5000))
            arrived.set()

        n.start_soon(reader)
        await trio.sleep(0.2)  # the reader waits for local appends now
        before = await _commands(redis)
        with trio.fail_after(2):
            await stream.append([(b"second", "")])
            await arrived.wait()
        after = await _commands(redis)
        assert [i.data for i in got] == [b"second"]
        assert after.get("xreadgroup", 0) - before.get("xreadgroup", 0) == 1  # inside EVALSHA
        pending = await redis.execute("XPENDING", "t:stream", "a", "-", "+", 10)
        # in our PEL like any XREADGROUP read ("first" was never acked either)
        assert [(p[0].decode(), p[1]) for p in pending] == [(first, b"c1"), (got[0].id, b"c1")]
        n.start_soon(stream.run_maintenance, 3600.0)
        await trio.sleep(0.05)
        await stream.ack("a", [i.id for i in got])
        assert (await redis.execute("XPENDING", "t:stream", "a"))[0] == 2  # not sent yet
        await trio.sleep(0.2)  # ACK_DELAY later: one XACK for the batch
        assert (await redis.execute("XPENDING", "t:stream", "a"))[0] == 1  # "first" stays
        n.cancel_scope.cancel()


async def test_group_every_item_skips_is_not_woken_and_the_append_acks_them(redis_server):
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis)
        await n.start(link.run)
        n.start_soon(stream.run_maintenance, 3600.0)
        await stream.append([(b"x", "")])
        await _drain(stream, "b", 1)
        got: list = []
        arrived = trio.Event()

        async def reader():
            while True:
                got.extend(await stream.read("b", 10, block_ms=300))
                arrived.set()

        n.start_soon(reader)
        await trio.sleep(0.1)
        await stream.append([(f"s{i}".encode(), "") for i in range(5)], skips=[{"b"}] * 5)
        assert stream.skipped == {"b": 5}
        # the append's own read for the waiting reader took them and acknowledged them
        ((last, _),) = await redis.execute("XREVRANGE", "t:stream", "+", "-", "COUNT", 1)
        groups = await redis.execute("XINFO", "GROUPS", "t:stream")
        infos = [dict(zip(g[::2], g[1::2], strict=True)) for g in groups]
        (info,) = [i for i in infos if i[b"name"] == b"b"]
        assert info[b"last-delivered-id"] == last
        assert info[b"pending"] == 1  # "x" only
        await trio.sleep(0.1)
        assert got == []
        assert not arrived.is_set()
        await stream.append([(b"for-b", "")])
        with trio.fail_after(3):
            await arrived.wait()
        assert [i.data for i in got] == [b"for-b"]
        await trio.sleep(0.6)
        pending = await redis.execute("XPENDING", "t:stream", "b")
        assert pending[0] == 2  # "x" and "for-b", not acked by this test; no skipped entry
        assert await stream.depth("a") == 7  # group a sees everything
        n.cancel_scope.cancel()


async def test_release_re_reads_own_pending_at_once_but_not_deferred_acks(redis_server):
    """A restarted consumer (release) re-reads our pending entries at once, even while
    caught up (its poll is 5 s away); an entry whose ack is deferred (ACK_DELAY) is not
    handed out again."""
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis)
        await n.start(link.run)
        n.start_soon(stream.run_maintenance, 3600.0)
        await stream.append([(b"one", ""), (b"two", "")])
        got = await _drain(stream, "a", 2)
        assert [i.data for i in got] == [b"one", b"two"]
        with trio.move_on_after(0.3):  # caught up: waits for a hand-over now
            extra = await stream.read("a", 10, block_ms=5000)
            raise AssertionError(f"nothing new was appended: {extra}")
        await stream.ack("a", [got[0].id])  # deferred: still pending in Redis
        assert stream.release("a") == 1  # "two" was handed out, never acknowledged
        with trio.fail_after(2):
            again = await stream.read("a", 10, block_ms=5000)
        assert [i.data for i in again] == [b"two"]
        with trio.move_on_after(0.3):
            extra = await stream.read("a", 10, block_ms=5000)
            raise AssertionError(f"handed out twice: {extra}")
        await trio.sleep(0.1)  # ACK_DELAY later the deferred ack went out
        pending = await redis.execute("XPENDING", "t:stream", "a", "-", "+", 10)
        assert [p[0].decode() for p in pending] == [again[0].id]
        n.cancel_scope.cancel()


async def test_memory_item_moved_while_in_flight_is_read_again_and_its_late_ack_stays_local(
    redis_server,
):
    """An item a group still holds when Redis returns is moved too (after MIGRATION_WAIT),
    without that group in its skips: the group reads the stream copy again. Its late ack
    of the memory item finishes nothing in Redis and sends no command there."""
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis)
        await n.start(link.run)
        redis_server.kill()
        await stream.append([(b"m0", ""), (b"m1", "")])
        assert not link.up
        held = await _drain(stream, "a", 2)
        assert [(i.data, i.origin) for i in held] == [
            (b"m0", Origin.MEMORY),
            (b"m1", Origin.MEMORY),
        ]
        await stream.ack("a", [held[0].id])  # m1 stays in flight across the recovery
        redis_server.start()
        with trio.fail_after(15):
            while not link.up:
                await link.changed.wait()
        assert stream.memory_items == 0
        before = (await _commands(redis)).get("xack", 0)
        await stream.ack("a", [held[1].id])
        assert (await _commands(redis)).get("xack", 0) == before  # nothing for a memory id
        again = await _drain(stream, "a", 1)
        assert [(i.data, i.origin) for i in again] == [(b"m1", Origin.REDIS)]
        b = await _drain(stream, "b", 2)
        assert [i.data for i in b] == [b"m0", b"m1"]
        assert link.up
        n.cancel_scope.cancel()


async def test_append_waiting_for_memory_room_when_redis_returns_keeps_the_order(redis_server):
    """Memory full while Redis is away: the waiting append resumes once the memory items
    moved into the stream, and every group still reads everything in append order."""
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link, stream = await _stream(redis, memory_limit=2)
        await n.start(link.run)
        redis_server.kill()
        first = await stream.append([(b"1", ""), (b"2", "")])
        later: list = []
        appended = trio.Event()

        async def waiting() -> None:
            later.extend(await stream.append([(b"3", ""), (b"4", "")]))
            appended.set()

        n.start_soon(waiting)
        await trio.sleep(0.2)
        assert not appended.is_set()
        redis_server.start()
        with trio.fail_after(15):
            await appended.wait()
        assert link.up
        assert all(r.safe for r in first)  # moved into the stream
        for g in GROUPS:
            got = await _drain(stream, g, 4)
            assert [i.data for i in got] == [b"1", b"2", b"3", b"4"]
            await stream.ack(g, [i.id for i in got])
        with trio.fail_after(5):
            for r in later:
                await r.wait()
        n.cancel_scope.cancel()
