"""Watchdog and status surface against the real bridge process (issue 5's must-shows)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tests.integration.test_status_server import CHROMIUM, NEEDS_CHROMIUM, chromium_cmd
from tests.support.bridge import ROOT, wait_until

ARTIFACTS = ROOT / "tests" / "artifacts"


def watchdog_events(backend) -> list[dict]:
    return [
        a["payload"]
        for a in backend.alerts()
        if a["payload"].get("_bridge", {}).get("origen") == "watchdog"
    ]


def heartbeat(empresa: str, sede: str, dev: str) -> dict:
    return {"tipo_mensaje": "heartbeat", "empresa": empresa, "sede": sede, "dispositivo": dev}


def test_offline_then_online(bridge_factory, backend, publisher):
    bridge_factory(env={"HEARTBEAT_TIMEOUT": "3"}).start()
    publisher.publish(heartbeat("cota", "sede1", "dev1"))
    t0 = time.monotonic()
    off = wait_until(lambda: watchdog_events(backend), 8, "offline event")
    elapsed = time.monotonic() - t0
    assert 3 <= elapsed <= 5, elapsed
    assert off[0]["status"] == "offline"
    assert off[0]["tipo_mensaje"] == "estado"
    assert (off[0]["empresa"], off[0]["sede"], off[0]["dispositivo"]) == ("cota", "sede1", "dev1")
    publisher.publish(heartbeat("cota", "sede1", "dev1"))
    events = wait_until(
        lambda: e if len(e := watchdog_events(backend)) >= 2 else None, 5, "online event"
    )
    assert events[1]["status"] == "online"


def test_no_storm_after_restart(bridge_factory, backend, publisher, redis_server):
    bridge = bridge_factory(redis_url=redis_server.url, env={"HEARTBEAT_TIMEOUT": "4"}).start()
    devices = [("cota", f"s{i % 4}", f"d{i}") for i in range(20)]

    def beat(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for d in devices:
                publisher.publish(heartbeat(*d))
            time.sleep(0.5)

    beat(3)
    assert bridge.terminate() == 0
    beat(1.5)  # the broker keeps them for the bridge's persistent session
    bridge.start()
    beat(8)
    assert watchdog_events(backend) == []
    status = bridge.status()
    cota = next(e for e in status["empresas"] if e["id"] == "cota")
    assert len(cota["devices"]) == 20
    assert all(d["state"] == "online" for d in cota["devices"])


def test_readyz_follows_the_broker(bridge_factory, mosquitto):
    bridge = bridge_factory().start()
    assert wait_until(lambda: bridge.http("/readyz")[0] == 200, 5, "ready")
    mosquitto.stop()
    t0 = time.monotonic()
    code, body = wait_until(
        lambda: r if (r := bridge.http("/readyz"))[0] == 503 else None, 10, "503"
    )
    assert time.monotonic() - t0 < 10
    assert b"mqtt" in body
    mosquitto.start()
    wait_until(lambda: bridge.http("/readyz")[0] == 200, 30, "ready again")
    assert bridge.http("/healthz")[0] == 200


def test_metrics_count_what_was_sent(bridge_factory, backend, publisher):
    bridge = bridge_factory().start()
    for i in range(10):
        publisher.publish(
            {"tipo_mensaje": "alarmas", "tipo_alarma": "C", "empresa": "cota", "seq": i}
        )
    wait_until(lambda: len(backend.alerts()) >= 10, 10, "10 alerts")

    def sample(name: str, **labels: str) -> float | None:
        code, body = bridge.http("/metrics")
        assert code == 200
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return None

    assert sample("botonera_messages_received_total", tipo="alarmas") == 10
    wait_until(lambda: sample("botonera_delivered_total", sink="backend") == 10, 5, "delivered 10")
    for name in (
        "botonera_retries_total",
        "botonera_queue_depth",
        "botonera_devices",
        "botonera_mqtt_connected",
        "botonera_redis_connected",
        "botonera_delivery_seconds_bucket",
    ):
        assert sample(name) is not None, name


def test_systemd_notify(bridge_factory, mosquitto, tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    got: list[tuple[float, str]] = []

    def collect(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                got.append((time.monotonic(), sock.recv(4096).decode()))
            except TimeoutError:
                pass

    try:
        bridge = bridge_factory(
            env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        ).start()
        collect(3)
        texts = [t for _, t in got]
        assert any("READY=1" in t for t in texts)
        assert sum("WATCHDOG=1" in t for t in texts) >= 3
        mosquitto.stop()
        wait_until(lambda: bridge.http("/readyz")[0] == 503, 10, "not ready")
        got.clear()
        collect(2.5)
        # issue 11: a broker outage is reported (STATUS=, /readyz), never a reason for
        # systemd to restart a healthy bridge: WATCHDOG=1 keeps coming
        assert sum("WATCHDOG=1" in t for _, t in got) >= 3, got
        mosquitto.start()
        wait_until(lambda: bridge.http("/readyz")[0] == 200, 30, "ready again")
        got.clear()
        collect(2.5)
        assert any("WATCHDOG=1" in t for _, t in got)
    finally:
        sock.close()


def test_status_token(bridge_factory):
    token = "tok-" + os.urandom(6).hex()
    bridge = bridge_factory(conf={"status": {"token": token}}).start()
    assert bridge.http("/healthz")[0] == 200
    for path in ("/readyz", "/metrics", "/api/status", "/"):
        assert bridge.http(path)[0] == 401, path
        assert bridge.http(path, token=token)[0] in (200, 503), path


@NEEDS_CHROMIUM
def test_page_in_chromium_shows_live_state(bridge_factory, backend, publisher, tmp_path):
    bridge = bridge_factory(env={"HEARTBEAT_TIMEOUT": "60"}).start()
    publisher.publish(heartbeat("cota", "principal", "panel1"))
    publisher.publish({"tipo_mensaje": "semaforos", "tipo_alarma": "ROJO", "empresa": "cota"})
    wait_until(lambda: len(backend.alerts()) >= 1, 10, "semaforo forwarded")
    url = f"http://127.0.0.1:{bridge.status_port}/"
    env = dict(os.environ, HOME=str(tmp_path))
    dom = subprocess.run(
        chromium_cmd(tmp_path / "p", "--dump-dom", url),
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    ).stdout
    for nombre in ("Cota", "Tocancipá", "Funza", "Madrid"):
        assert nombre in dom, nombre
    assert "en línea" in dom
    assert "ROJO" in dom
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page-e2e.png"
    subprocess.run(
        chromium_cmd(tmp_path / "p2", f"--screenshot={shot}", "--window-size=420,1400", url),
        capture_output=True, env=env, timeout=90, check=True,
    )  # fmt: skip
    assert shot.stat().st_size > 10_000
    assert Path(CHROMIUM).exists()


def test_readyz_reports_a_stalled_sink(bridge_factory, backend, publisher):
    bridge = bridge_factory(conf={"heartbeat": {"stall_timeout": 2.0}}).start()
    assert wait_until(lambda: bridge.http("/readyz")[0] == 200, 5, "ready")
    backend.fault(status=503, seconds=60)
    publisher.publish({"tipo_mensaje": "alarmas", "tipo_alarma": "C", "empresa": "cota"})
    code, body = wait_until(
        lambda: r if (r := bridge.http("/readyz"))[0] == 503 else None, 10, "503"
    )
    assert b"backend: stalled" in body
    backend.clear_fault()
    wait_until(lambda: bridge.http("/readyz")[0] == 200, 15, "ready after the backend returns")


def test_a_progressing_whatsapp_backlog_is_not_stalled(bridge_factory, publisher, redis_server):
    # one contact, 4 distinct alarms 6 s apart (alarms published together would share one
    # digest): the 6 s spacing keeps a WhatsApp backlog for ~18 s, with a send every 6 s;
    # a sink that finishes work every 6 s is not stalled at 8 s
    bridge = bridge_factory(
        redis_url=redis_server.url,
        conf={
            "heartbeat": {"stall_timeout": 8.0},
            "empresas": [{"id": "cota", "nombre": "Cota", "contactos": ["+573001112233"]}],
        },
    ).start()
    start = time.monotonic()
    for i in range(4):
        while time.monotonic() < start + (0, 1, 7, 13)[i]:  # each one waits for the next slot
            code, body = bridge.http("/readyz")
            assert code == 200, body
            time.sleep(0.5)
        publisher.publish(
            {
                "tipo_mensaje": "alarmas",
                "tipo_alarma": "C",
                "descripcion": f"a{i}",
                "empresa": "cota",
            }
        )
    end = start + 16
    while time.monotonic() < end:
        code, body = bridge.http("/readyz")
        assert code == 200, body
        time.sleep(0.5)
    assert bridge.log_text().count("WhatsApp → +57******2233") >= 3
