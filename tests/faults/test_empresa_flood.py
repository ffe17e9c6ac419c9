"""Issue 9, must-show 5: 8,000 alarms, each from a new unconfigured empresa, with
``central`` set. The status API stays fast while the flood is built, the board stays
bounded (one shared bucket), and escalations toward central are digests: at most one
message per escalation round."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

CENTRAL = "+573009990000"
FLOOD = 8000
AFTER = 4.0  # escalation.after, seconds


def timed_get(url: str) -> tuple[int, float]:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        resp.read()
        status = resp.status
    return status, time.monotonic() - t0


def poll_both(base: str, seconds: float) -> dict[str, list[float]]:
    """Ask for /api/status and, while it is being built, /healthz, again and again."""
    timings: dict[str, list[float]] = {"/healthz": [], "/api/status": []}
    end = time.monotonic() + seconds

    def loop(path: str) -> None:
        while time.monotonic() < end:  # bounded by `seconds`
            status, took = timed_get(base + path)
            assert status == 200
            timings[path].append(took)
            time.sleep(0.02)

    threads = [threading.Thread(target=loop, args=(p,), daemon=True) for p in timings]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 10)
    return timings


def test_alarms_from_8000_new_empresas(bridge_factory, backend, publisher):
    bridge = bridge_factory(
        conf={"central": [CENTRAL], "escalation": {"after": AFTER, "max": 2}}
    ).start()
    base = f"http://127.0.0.1:{bridge.status_port}"
    publisher.publish_all(
        {
            "tipo_mensaje": "alarmas",
            "tipo_alarma": "CRITICA",
            "descripcion": f"Alarma {n}",
            "empresa": f"nueva{n}",
            "id": n,
        }
        for n in range(FLOOD)
    )
    published = time.monotonic()
    backend.wait_for(lambda: len(backend.alerts()) >= FLOOD, 120, what="every alarm")
    # the board holds what 8,000 empresas sent, escalation rounds run: status stays cheap
    timings = poll_both(base, max(3.0, published + 2 * AFTER + 1 - time.monotonic()))
    print(
        "slowest /api/status", sorted(timings["/api/status"])[-3:],
        "slowest /healthz", sorted(timings["/healthz"])[-3:],
    )  # fmt: skip
    assert len(timings["/api/status"]) >= 10
    assert max(timings["/api/status"]) <= 0.5, sorted(timings["/api/status"])[-5:]
    assert max(timings["/healthz"]) <= 0.2, sorted(timings["/healthz"])[-5:]

    snap = bridge.status()
    blocks = {e["id"]: e for e in snap["empresas"]}
    shared = blocks["sin_configurar"]
    assert 0 < len(shared["alarms"]) <= 50
    assert shared["alarms_total"] <= 200  # one bucket for every unconfigured empresa

    log = bridge.log_text()
    # what each round sent toward central (the sink then sends it at central's pace)
    rounds = re.findall(
        r"escalation round: (\d+) alarms unattended; \d+ messages to contacts, (\d+) to 1 "
        r"central numbers",
        log,
    )
    assert rounds
    assert sum(int(due) for due, _ in rounds) > 100  # the flood did escalate
    assert all(int(to_central) <= 1 for _, to_central in rounds), rounds
    assert "alarm board of sin_configurar over 200 alarms" in log
    assert bridge.running()
