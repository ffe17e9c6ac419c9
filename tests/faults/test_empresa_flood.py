"""Issue 9, must-show 5: 8,000 alarms, each from a new unconfigured empresa, with
``central`` set. The status API stays fast while the flood is built, the board stays
bounded (one shared bucket), and escalations toward central are digests: at most one
message per escalation round."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

CENTRAL = "+573009990000"
FLOOD = 8000
AFTER = 4.0  # escalation.after, seconds

# Polls /healthz and /api/status in two threads until SIGTERM, one line per answer:
# path, seconds, status, and the seconds the bridge's event-loop thread spent in that time
# waiting for a CPU (/proc/<pid>/schedstat, run_delay). Its own process: the test's
# publisher (8,000 messages through paho, holding the GIL) must not count as latency.
POLLER = """
import signal, sys, threading, time, urllib.request
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
out = threading.Lock()
def waited():
    with open(f"/proc/{sys.argv[2]}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9
def loop(path):
    while not stop.is_set():
        w0, t0 = waited(), time.monotonic()
        try:
            with urllib.request.urlopen(sys.argv[1] + path, timeout=5) as resp:
                resp.read()
                status = str(resp.status)
        except Exception as exc:
            status = type(exc).__name__
        took, w = time.monotonic() - t0, waited() - w0
        with out:
            print(path, took, status, w, flush=True)
        stop.wait(0.02)
threads = [threading.Thread(target=loop, args=(p,)) for p in ("/healthz", "/api/status")]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""
BOUNDS = {"/healthz": 0.2, "/api/status": 0.5}  # seconds, the issue's
GUARD = 2.0  # seconds: however loaded the machine (the flood once blocked it for 6 s)


class Poller:
    """Ask for /healthz and /api/status again and again, from another process, until the
    block ends; then check every answer against the issue's bounds."""

    def __init__(self, base: str, pid: int) -> None:
        self.args = [base, str(pid)]
        self.timings: dict[str, list[tuple[float, float]]] = {p: [] for p in BOUNDS}

    def __enter__(self) -> Poller:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", POLLER, *self.args], stdout=subprocess.PIPE, text=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=15)
        assert self.proc.returncode == 0, "the poller failed"
        for line in out.splitlines():
            path, took, status, waited = line.split()
            assert status == "200", line
            self.timings[path].append((float(took), float(waited)))

    def check(self, when: str, *, raw_within_bounds: bool = False) -> None:
        """Each answer within the issue's bound once the time the bridge could not run,
        because the machine's CPUs were busy elsewhere, is taken out; raw, within GUARD
        (or within the bound itself with ``raw_within_bounds``)."""
        assert len(self.timings["/api/status"]) >= 10, when
        for path, bound in BOUNDS.items():
            raw = sorted(t for t, _ in self.timings[path])
            own = sorted(max(0.0, t - w) for t, w in self.timings[path])
            print(f"{when}: {len(raw)} polls of {path}, slowest {raw[-3:]}, "
                  f"without CPU waits {own[-3:]}")  # fmt: skip
            assert own[-1] <= bound, (when, path, own[-5:])
            assert raw[-1] <= (bound if raw_within_bounds else GUARD), (when, path, raw[-5:])


def test_alarms_from_8000_new_empresas(bridge_factory, backend, publisher):
    bridge = bridge_factory(
        conf={"central": [CENTRAL], "escalation": {"after": AFTER, "max": 2}}
    ).start()
    base = f"http://127.0.0.1:{bridge.status_port}"
    with Poller(base, bridge.pid) as during:  # while the board is being built
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
        # every 0.5 s: the whole list of 8,000 alerts, fetched 20 times a second, took
        # the 2 cores from the bridge being measured
        backend.wait_for(
            lambda: len(backend.alerts()) >= FLOOD, 120, interval=0.5, what="every alarm"
        )
    during.check("during ingestion")
    # the board holds what 8,000 empresas sent, escalation rounds run: status stays cheap
    with Poller(base, bridge.pid) as after:
        time.sleep(max(3.0, published + 2 * AFTER + 1 - time.monotonic()))
    after.check("after ingestion", raw_within_bounds=True)

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
