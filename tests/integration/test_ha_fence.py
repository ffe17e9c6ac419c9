"""The fencing token of ha.py in the outbox append script, against a real redis-server."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio

from botonera_bridge.config import from_mapping
from botonera_bridge.errors import ConfigError, FencedError
from botonera_bridge.metrics import Metrics
from botonera_bridge.queues.link import RedisLink
from botonera_bridge.queues.redis_client import open_redis
from botonera_bridge.queues.streams import DurableStream


@dataclass
class _Fence:
    key: str
    token: str
    ok: bool = True

    def valid(self) -> bool:
        return self.ok


async def test_append_under_a_lost_lease_appends_nothing(redis_server):
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link = RedisLink(redis, metrics=Metrics())
        stream = DurableStream(
            link, "t:out", ("g",), consumer="c", memory_limit=10, dedup_prefix="t:seen:"
        )
        await n.start(link.run)
        lease = "t:replicas:bridge-b"
        await redis.execute("SET", lease, "bridge-b 1 x")
        mine = _Fence(lease, "bridge-b 1 x")
        (r,) = await stream.append([(b"one", "k1")], fence=mine)
        assert r.safe
        # another replica adopted the session: its token is in the lease now
        await redis.execute("SET", lease, "bridge-a 2 y")
        with pytest.raises(FencedError):
            await stream.append([(b"two", "k2"), (b"three", "")], fence=mine)
        assert await redis.execute("XLEN", "t:out") == 1
        assert await redis.execute("EXISTS", "t:seen:k2") == 0  # no dedup key written either
        assert link.up, "a fenced append is not a Redis failure"
        # the adopter's appends pass
        await stream.append([(b"two", "k2")], fence=_Fence(lease, "bridge-a 2 y"))
        assert await redis.execute("XLEN", "t:out") == 2
        # an absent lease (Redis restarted, or it expired and nobody adopted it) fences
        # nothing: ha.py re-claims it; the local check still has the last word
        await redis.execute("DEL", lease)
        await stream.append([(b"three", "k3")], fence=mine)
        assert await redis.execute("XLEN", "t:out") == 3
        # without Redis, the local check decides (a frozen replica): nothing goes to memory
        link.down(RuntimeError("test"))
        with pytest.raises(FencedError):
            await stream.append([(b"four", "")], fence=_Fence(lease, "bridge-b 1 x", ok=False))
        assert stream.memory_items == 0
        n.cancel_scope.cancel()


async def _xreadgroups(redis) -> int:
    info = (await redis.execute("INFO", "commandstats")).decode()
    for line in info.splitlines():
        if line.startswith("cmdstat_xreadgroup:"):
            return int(line.split(":", 1)[1].split(",")[0].split("=")[1])
    return 0


async def test_fenced_append_reads_through_for_a_waiting_reader(redis_server):
    """One script: fence check (KEYS[2]/ARGV[2]), then the reads for waiting readers, then
    the items. A waiting reader's poll is 5 s away, so what it gets within 2 s came from
    the append's own read; a fenced append appends and hands over nothing."""
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link = RedisLink(redis, metrics=Metrics())
        stream = DurableStream(
            link, "t:out", ("g", "h"), consumer="c", memory_limit=10, dedup_prefix="t:seen:"
        )
        await n.start(link.run)
        lease = "t:replicas:bridge-b"
        await redis.execute("SET", lease, "bridge-b 1 x")
        mine = _Fence(lease, "bridge-b 1 x")
        await stream.append([(b"zero", "")], fence=mine)
        with trio.fail_after(5):
            assert [i.data for i in await stream.read("g", 10, block_ms=100)] == [b"zero"]
        with trio.move_on_after(0.3):  # caught up: nothing more
            assert await stream.read("g", 10, block_ms=100) == []

        async def read_one(into: list, done: trio.Event) -> None:
            into.extend(await stream.read("g", 10, block_ms=5000))
            done.set()

        got: list = []
        done = trio.Event()
        n.start_soon(read_one, got, done)
        await trio.sleep(0.2)  # the reader waits for a hand-over now
        before = await _xreadgroups(redis)
        with trio.fail_after(2):
            await stream.append([(b"one", "k1"), (b"skip-g", "")], fence=mine, skips=[set(), {"g"}])
            await done.wait()
        assert await _xreadgroups(redis) - before == 1  # the script's own, no poll
        assert [i.data for i in got] == [b"one"]
        assert await redis.execute("EXISTS", "t:seen:k1") == 1
        # a re-delivery of k1 under the fence: dropped by its dedup key (items start
        # after the group-read arguments)
        got.clear()
        done = trio.Event()
        n.start_soon(read_one, got, done)
        await trio.sleep(0.2)
        (r,) = await stream.append([(b"one again", "?k1")], fence=mine)
        assert r.safe
        assert await redis.execute("XLEN", "t:out") == 3
        # another replica adopted the session: nothing appended, nothing handed over
        await redis.execute("SET", lease, "bridge-a 2 y")
        with pytest.raises(FencedError):
            await stream.append([(b"two", "k2")], fence=mine)
        assert await redis.execute("XLEN", "t:out") == 3
        assert await redis.execute("EXISTS", "t:seen:k2") == 0
        assert link.up
        await trio.sleep(0.2)
        assert got == []
        # the waiting reader still gets the adopter's append from that append's read
        before = await _xreadgroups(redis)
        with trio.fail_after(2):
            await stream.append([(b"three", "k3")], fence=_Fence(lease, "bridge-a 2 y"))
            await done.wait()
        assert await _xreadgroups(redis) - before == 1
        assert [i.data for i in got] == [b"three"]
        n.cancel_scope.cancel()


def test_ha_config_keys_and_env():
    s = from_mapping({"ha": {"enabled": True, "lease": 3}}, env={})
    assert s.ha.enabled
    assert s.ha.lease == 3.0
    s = from_mapping({}, env={"HA_ENABLED": "true", "HA_LEASE": "5"})
    assert s.ha.enabled
    assert s.ha.lease == 5.0
    assert not from_mapping({}, env={}).ha.enabled
    with pytest.raises(ConfigError, match="ha.enabled needs redis.url"):
        from_mapping({"ha": {"enabled": True}, "redis": {"url": ""}}, env={})
    with pytest.raises(ConfigError, match="ha.lease"):
        from_mapping({"ha": {"lease": 0.1}}, env={})
    with pytest.raises(ConfigError, match="HA_ENABLED"):
        from_mapping({}, env={"HA_ENABLED": "maybe"})


async def test_take_over_claims_a_dead_consumers_pending_entries_at_once(redis_server):
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link = RedisLink(redis, metrics=Metrics())
        dead = DurableStream(link, "t:out", ("g", "h"), consumer="bridge-b", memory_limit=10)
        live = DurableStream(link, "t:out", ("g", "h"), consumer="bridge-a", memory_limit=10)
        await n.start(link.run)
        await dead.append([(f"e{i}".encode(), "") for i in range(5)])
        with trio.fail_after(5):
            got = await dead.read("g", 3)  # read, never acked: bridge-b died delivering them
        assert len(got) == 3
        assert await live.take_over("bridge-b") == 3  # (group h never read them: not pending)
        with trio.fail_after(5):
            mine = await live.read("g", 10)
        assert [i.data for i in mine] == [b"e0", b"e1", b"e2"]
        pending = await redis.execute("XPENDING", "t:out", "g", "-", "+", 10, "bridge-b")
        assert pending == []
        assert await live.take_over("bridge-b") == 0
        n.cancel_scope.cancel()
