"""Scenarios 3 and 4: Redis lost mid-stream (memory fallback), and Redis restarted empty."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.support.bridge import wait_until

from .conftest import PacedPublisher, alarms, keys_by_seq, metrics, wait_all_seqs

N = 1000


@pytest.mark.slow
def test_redis_killed_mid_stream_falls_back_to_memory_and_loses_nothing(
    bridge_factory, backend, publisher, redis_server
):
    # ~200/s over 4 lanes: the outbox holds work when Redis dies
    backend.fault(delay=0.02)
    bridge = bridge_factory().start()
    pid = bridge.pid
    assert metrics(bridge)["botonera_redis_connected"] == 1.0
    pub = PacedPublisher(publisher, alarms(N), rate=300)
    pub.start()
    wait_until(lambda: pub.published >= 0.3 * N, 30, "30% of the alarms published")
    redis_server.kill()
    killed = time.monotonic()
    # The backend answers 503 from Redis's death until the bridge says Redis is back, so
    # the memory fallback surely holds alarms when Redis returns (they cannot finish).
    backend.fault(status=503)
    seen: dict[str, float] = {}
    while time.monotonic() - killed < 5:  # the outage: the fallback must show in the metrics
        m = metrics(bridge)
        if m.get("botonera_memory_fallback") == 1.0 and m.get("botonera_redis_connected") == 0.0:
            seen["fallback"] = 1.0
            seen["memory"] = max(
                seen.get("memory", 0.0), m.get('botonera_queue_depth{queue="memory"}', 0.0)
            )
        time.sleep(0.2)
    redis_server.start()
    assert seen.get("fallback") == 1.0, "botonera_memory_fallback/redis_connected never showed it"
    assert seen["memory"] > 0, "nothing was held in memory during the outage"
    wait_until(lambda: "Redis is back" in bridge.log_text(), 30, "the bridge to use Redis again")
    back = time.monotonic() - killed - 5
    backend.clear_fault()

    pub.finish(60)
    wait_all_seqs(backend, set(range(N)), timeout=60)
    assert bridge.running()
    assert bridge.pid == pid
    assert all(len(k) == 1 for k in keys_by_seq(backend).values())
    log = bridge.log_text()
    assert re.search(r"WARNING .*Redis unavailable", log), log[-3000:]
    moved = [int(n) for n in re.findall(r"moved (\d+) memory items into the Redis stream", log)]
    assert sum(moved) > 0, "memory contents never moved into the stream"
    m = wait_until(
        lambda: m if (m := metrics(bridge)).get("botonera_redis_connected") == 1.0 else None,
        15,
        "redis_connected back to 1",
    )
    assert m["botonera_memory_fallback"] == 0.0
    wait_until(
        lambda: metrics(bridge).get('botonera_queue_depth{queue="memory"}') == 0.0,
        10,
        "memory empty",
    )
    print(
        f"scenario 3: peak memory gauge {seen['memory']:.0f}, Redis in use again {back:.1f}s "
        f"after restart, moved {moved} into the stream"
    )


@pytest.mark.slow
def test_redis_restarted_empty_recreates_groups_and_keeps_delivering(
    bridge_factory, backend, publisher, redis_server
):
    bridge = bridge_factory().start()
    pid = bridge.pid
    publisher.publish_all(alarms(100))
    wait_all_seqs(backend, set(range(100)), timeout=30)
    redis_server.kill()
    redis_server.wipe()
    time.sleep(1)
    redis_server.start()
    wait_until(
        lambda: "possible data loss" in bridge.log_text(), 30, "the 'possible data loss' warning"
    )
    publisher.publish_all(alarms(200, start=100))
    wait_all_seqs(backend, set(range(300)), timeout=30)
    assert bridge.running()
    assert bridge.pid == pid
    log = bridge.log_text()
    assert re.search(r"WARNING .*recreated; possible data loss", log)
    assert "died; restarting" not in log, "a task crashed (crash loop?)"
    groups = subprocess.run(
        ["redis-cli", "-p", str(redis_server.port), "XINFO", "GROUPS", "botonera:outbox"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    assert "backend" in groups, groups
    assert "whatsapp" in groups, groups
    wait_until(lambda: bridge.http("/readyz")[0] == 200, 15, "/readyz 200")
