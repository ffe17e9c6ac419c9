"""Scenario 10: a 20,000-alarm burst with the backend down keeps RSS bounded."""

from __future__ import annotations

import time

import pytest

from tests.support.bridge import wait_until

from .conftest import RssSampler, alarms, metrics, wait_all_seqs

N = 20_000
RSS_LIMIT = 150 * 1024 * 1024  # bytes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_20000_burst_with_backend_down_stays_under_150mb_and_all_delivered(
    bridge_factory, make_backend, publisher
):
    backend = make_backend(quiet=True)
    bridge = bridge_factory(backend_url=backend.url).start()
    rss = RssSampler(bridge.pid)
    rss.start()
    backend.kill()
    t0 = time.monotonic()
    publisher.publish_all(alarms(N))  # waits until the broker acknowledged every one
    published = time.monotonic() - t0
    wait_until(
        lambda: metrics(bridge).get('botonera_messages_received_total{tipo="alarmas"}') == N,
        120,
        f"the bridge to take all {N} alarms",
        every=0.5,
    )
    taken = time.monotonic() - t0
    time.sleep(3)  # the backend sink keeps retrying its lanes
    peak_down = rss.peak
    backend.start()
    t1 = time.monotonic()
    wait_all_seqs(backend, set(range(N)), timeout=150, every=2.0)
    drained = time.monotonic() - t1
    rss.stop()
    assert rss.samples > 10
    assert rss.peak < RSS_LIMIT, f"peak RSS {rss.peak / 2**20:.1f} MiB"
    assert len(backend.alerts()) == N
    print(
        f"scenario 10: published {N} in {published:.1f}s, bridge took them in {taken:.1f}s, "
        f"peak RSS {peak_down / 2**20:.1f} MiB while down, {rss.peak / 2**20:.1f} MiB overall; "
        f"backend drained in {drained:.1f}s"
    )
