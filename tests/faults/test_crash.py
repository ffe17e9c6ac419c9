"""Scenario 1: SIGKILL the bridge mid-stream; nothing is lost, redeliveries keep their key."""

from __future__ import annotations

import time

import pytest

from tests.support.bridge import wait_until

from .conftest import PacedPublisher, alarms, keys_by_seq, wait_all_seqs

N = 3000


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing_and_keeps_idempotency_keys(
    bridge_factory, backend, publisher
):
    bridge = bridge_factory().start()
    first_pid = bridge.pid
    pub = PacedPublisher(publisher, alarms(N), rate=1000)
    pub.start()
    delivered_at_kill = wait_until(
        lambda: n if (n := len(backend.alerts())) >= 1000 else None, 30, "1,000 alarms delivered"
    )
    bridge.kill()
    assert delivered_at_kill < N, "the kill came too late to be mid-stream"
    time.sleep(2)
    bridge.start()
    assert bridge.pid != first_pid
    t0 = time.monotonic()
    pub.finish(30)
    wait_all_seqs(backend, set(range(N)), timeout=60 - (time.monotonic() - t0))
    recovered = time.monotonic() - t0

    keys = keys_by_seq(backend)
    assert set(keys) == set(range(N))
    reused = {s: k for s, k in keys.items() if len(k) != 1}
    assert not reused, f"redeliveries with a different Idempotency-Key: {list(reused.items())[:5]}"
    alerts = backend.alerts()
    assert len(alerts) == N  # the backend stores one alert per key: no second identity
    posts = len(backend.requests())
    print(
        f"scenario 1: killed at {delivered_at_kill} delivered, all {N} in {recovered:.1f}s "
        f"after restart, {posts - N} duplicate POSTs (same key)"
    )
