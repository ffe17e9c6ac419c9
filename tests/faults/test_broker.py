"""Scenario 2: mosquitto (persistence on) restarted mid-stream; nothing is lost."""

from __future__ import annotations

import time

import pytest

from tests.support.bridge import wait_until

from .conftest import PacedPublisher, alarms, keys_by_seq, wait_all_seqs

N = 2000


@pytest.mark.slow
def test_broker_restart_mid_stream_loses_nothing(bridge_factory, backend, publisher, mosquitto):
    # a slower backend keeps messages queued in the broker for the bridge's session
    backend.fault(delay=0.02)  # ~200/s over 4 lanes, publishing at 500/s
    bridge = bridge_factory().start()
    pid = bridge.pid
    pub = PacedPublisher(publisher, alarms(N), rate=500)
    pub.start()
    at_restart = wait_until(
        lambda: n if (n := len(backend.alerts())) >= 400 else None, 30, "400 alarms delivered"
    )
    backlog = pub.published - at_restart
    mosquitto.restart()  # SIGTERM (the broker saves its persistence file), start on the same port
    t0 = time.monotonic()
    assert backlog > 100, f"no backlog in the broker at restart ({backlog})"
    pub.finish(60)
    wait_all_seqs(backend, set(range(N)), timeout=60)
    took = time.monotonic() - t0
    assert bridge.running()
    assert bridge.pid == pid
    assert all(len(k) == 1 for k in keys_by_seq(backend).values())
    assert len(backend.alerts()) == N
    log = bridge.log_text()
    assert "reconnecting" in log
    print(
        f"scenario 2: broker restarted at {at_restart} delivered, backlog {backlog}; "
        f"all {N} {took:.1f}s later"
    )
