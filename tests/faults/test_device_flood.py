"""Issue 9 must-show 4: 30,000 heartbeats for cota, each with a new dispositivo, then one
alarm: the alarm reaches the backend within 8 s of its publish, /healthz answers every
0.5 s poll within 0.5 s throughout, and a cap (heartbeat.max_devices) is a WARNING and a
metric, never a crash."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

from tests.support.bridge import wait_until

from .conftest import alarm

FLOOD = 30_000
POLL_EVERY = 0.5  # seconds
MAX_POLLS = 240  # the poller stops by itself after 2 minutes at most


class HealthPoller(threading.Thread):
    """GET /healthz every 0.5 s until stopped (bounded), recording each answer's time."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/healthz"
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        for _ in range(MAX_POLLS):
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    resp.read()
                    if resp.status != 200:
                        self.failures.append(f"HTTP {resp.status}")
            except OSError as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - t0)
            if self.halt.wait(max(0.0, POLL_EVERY - (time.monotonic() - t0))):
                return


def metric(bridge, name: str) -> float:
    code, body = bridge.http("/metrics")
    assert code == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


@pytest.mark.parametrize("max_devices", [None, 5000], ids=["default-cap", "cap-5000"])
def test_device_flood_does_not_freeze_intake(bridge_factory, backend, publisher, max_devices):
    conf = {"heartbeat": {"max_devices": max_devices}} if max_devices else {}
    bridge = bridge_factory(conf=conf).start()
    poller = HealthPoller(bridge.status_port)
    poller.start()
    try:
        t_flood = time.monotonic()
        publisher.publish_all(
            {
                "tipo_mensaje": "heartbeat",
                "empresa": "cota",
                "sede": "flood",
                "dispositivo": f"d{i}",
            }
            for i in range(FLOOD)
        )
        flood_published = time.monotonic() - t_flood
        t_alarm = time.monotonic()
        publisher.publish(alarm(1, "cota", descripcion="tras la inundación"))
        wait_until(lambda: backend.alerts(), 8, "the alarm after the flood")
        latency = time.monotonic() - t_alarm
    finally:
        poller.halt.set()
        poller.join(10)
    assert bridge.running()
    assert not poller.failures, poller.failures[:5]
    worst = max(poller.latencies)
    print(
        f"device flood: {FLOOD} heartbeats published in {flood_published:.1f}s, alarm at the "
        f"backend {latency:.2f}s after its publish, /healthz worst {worst * 1000:.0f} ms "
        f"over {len(poller.latencies)} polls"
    )
    assert latency <= 8
    assert worst <= 0.5
    cap = max_devices or 10_000
    watched = wait_until(
        lambda: n if (n := metric(bridge, 'botonera_devices{state="online"}')) >= cap else None,
        10,
        "the cap reached",
    )
    assert watched == cap
    assert metric(bridge, "botonera_devices_capped_total") == FLOOD - cap
    warnings = [ln for ln in bridge.log_text().splitlines() if "max_devices" in ln]
    assert len(warnings) == 1
    assert "WARNING" in warnings[0]
