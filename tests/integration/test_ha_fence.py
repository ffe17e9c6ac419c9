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
