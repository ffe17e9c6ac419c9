"""Scenario 5: the backend answers 503 for 60 s and the bridge is SIGKILLed 20 s into it."""

from __future__ import annotations

import time

import pytest

from tests.support.bridge import wait_until

from .conftest import EMPRESAS, alarms, keys_by_seq, metrics, wait_all_seqs

OUTAGE = 60.0  # seconds of 503
KILL_AT = 20.0  # seconds into the outage


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_backend_outage_with_a_crash_loses_nothing(bridge_factory, backend, publisher):
    bridge = bridge_factory().start()
    backend.fault(status=503, seconds=OUTAGE)
    t0 = time.monotonic()
    publisher.publish_all(alarms(300))  # before the crash
    wait_until(lambda: len(backend.requests()) > 0, 10, "the bridge to try the backend")
    time.sleep(max(0.0, KILL_AT - (time.monotonic() - t0)))
    assert metrics(bridge)['botonera_retries_total{sink="backend"}'] > 0
    bridge.kill()
    publisher.publish_all(alarms(200, start=300))  # while the bridge is dead
    time.sleep(2)
    bridge.start()
    publisher.publish_all(alarms(100, start=500))  # after the restart, still in the outage
    assert time.monotonic() - t0 < OUTAGE - 10, "the scenario setup overran the outage"
    assert not backend.alerts(), "the backend stored something during its outage"

    wait_all_seqs(backend, set(range(600)), timeout=OUTAGE + 30 - (time.monotonic() - t0))
    recovered = time.monotonic() - t0 - OUTAGE
    assert all(len(k) == 1 for k in keys_by_seq(backend).values())
    alerts = backend.alerts()
    assert len(alerts) == 600
    for e in EMPRESAS:  # per-empresa order survives the outage and the crash
        mine = [a["payload"]["seq"] for a in alerts if a["empresa"] == e]
        assert mine == sorted(mine), f"order broken for {e}: {mine[:20]}"
    print(f"scenario 5: all 600 at the backend {recovered:.1f}s after the outage ended")
