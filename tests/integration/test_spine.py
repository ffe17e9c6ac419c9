"""The spine end to end: real mosquitto, real reference backend, the bridge as a process."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import datetime

from tests.support.bridge import ROOT, BridgeProc, wait_until

SAMPLES = ROOT.parent / "shared" / "samples" / "botonera.jsonl"
SAMPLE_LINES = [
    b'{"tipo_mensaje": "semaforos", "tipo_alarma": "AZUL", "empresa": "cota"}',
    b'{"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "descripcion": "Fallo en sistema"}',
    b'{"tipo_mensaje": "estado", "status": "online", "timestamp": "2024-01-01T12:00:00"}',
    b'{"tipo_mensaje": "configuracion", "parametros": {"intervalo": 30, "modo": "automatico"}}',
    b'{"tipo_mensaje": "heartbeat", "timestamp": "2024-01-01T12:00:00"}',
]


def check_samples(backend, publisher) -> None:
    for line in SAMPLE_LINES:
        publisher.publish(line)
    posts = wait_until(
        lambda: (
            [r for r in backend.requests() if r["status"] < 300]
            if len(backend.requests()) >= 4
            else None
        ),
        15,
        "4 backend POSTs",
    )
    time.sleep(1.0)  # nothing more may arrive (the heartbeat is not forwarded)
    posts = backend.requests()
    assert len(posts) == 4, posts
    originals = [json.loads(x) for x in SAMPLE_LINES[:4]]
    # different empresas travel in parallel lanes: match by tipo, not arrival order
    bodies = sorted((dict(p["payload"]) for p in posts), key=lambda b: b["tipo_mensaje"])
    originals.sort(key=lambda b: b["tipo_mensaje"])
    for original, body in zip(originals, bodies, strict=True):
        bridge = body.pop("_bridge")
        assert body == original  # unchanged, field for field
        assert set(bridge) >= {"id", "topic", "recibido_en", "origen"}
        assert bridge["topic"] == "empresas"
        assert bridge["origen"] == "mqtt"
        assert bridge["recibido_en"].endswith("Z")
    for post in posts:
        assert post["idempotency_key"] == post["payload"]["_bridge"]["id"]
        assert post["content_type"] == "application/json"
        assert post["user_agent"].startswith("botonera-bridge/")


def test_samples_reach_backend(bridge_factory, backend, publisher):
    if SAMPLES.is_file():  # shared/ sits beside the checkout on developer machines and in CI
        assert [
            ln.strip() for ln in SAMPLES.read_bytes().splitlines() if ln.strip()
        ] == SAMPLE_LINES
    bridge_factory().start()
    check_samples(backend, publisher)


def test_backend_outage_then_all_delivered_in_order(
    bridge_factory, backend, publisher, redis_server
):
    bridge = bridge_factory(redis_url=redis_server.url).start()
    backend.fault(status=503, seconds=15)
    empresas = ["cota", "tocancipa", "funza", "madrid"]
    msgs = [
        {
            "tipo_mensaje": "alarmas",
            "tipo_alarma": "CRITICA",
            "descripcion": f"n{i}",
            "empresa": empresas[i % 4],
            "seq": i,
        }
        for i in range(200)
    ]
    publisher.publish_all(msgs)
    alerts = wait_until(lambda: len(backend.alerts()) >= 200 and backend.alerts(), 60, "200 alerts")
    seqs = [a["payload"]["seq"] for a in alerts]
    assert sorted(seqs) == list(range(200))
    for e in empresas:
        mine = [a["payload"]["seq"] for a in alerts if a["empresa"] == e]
        assert mine == sorted(mine), f"order broken for {e}"
    # every attempt for one event reused the same key
    by_seq: dict[int, set[str]] = {}
    for r in backend.requests():
        by_seq.setdefault(r["payload"]["seq"], set()).add(r["idempotency_key"])
    assert all(len(keys) == 1 for keys in by_seq.values())
    assert any(r["status"] == 503 for r in backend.requests())
    # the counter invariant: received = delivered + dead-lettered + in flight + queued
    inv = wait_until(
        lambda: drained(bridge.status()["invariant"]),
        10,
        "both sinks drained",
    )
    for sink in ("backend", "whatsapp"):
        assert inv[sink]["received"] == 200
        assert inv[sink]["holds"] is True, inv


BAD_INPUTS = [
    ("invalid_json", b'{"tipo_mensaje": "alarmas", '),
    ("invalid_schema", b"[1, 2, 3]"),
    ("unknown_tipo", b'{"tipo_mensaje": "bogus", "empresa": "cota"}'),
    # 100,000-deep is 200 KB: over max_payload before any parsing
    ("too_large", b'{"tipo_mensaje": "alarmas", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    # 30,000-deep fits in 64 KiB and reaches the decoder, which must refuse it cleanly
    ("too_deep", b'{"tipo_mensaje": "alarmas", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"),
    ("too_large", b'{"tipo_mensaje": "alarmas", "descripcion": "' + b"x" * (1 << 20) + b'"}'),
    ("invalid_utf8", b'{"tipo_mensaje": "alarmas", "descripcion": "\xff\xfe"}'),
    ("invalid_identifier", b'{"tipo_mensaje": "alarmas", "empresa": "co#ta"}'),
]


def test_bad_input_dead_lettered_counted_and_next_alarm_flows(
    bridge_factory, backend, publisher, redis_server
):
    bridge = bridge_factory(redis_url=redis_server.url).start()
    backend.fault(status=422, empresa="funza", count=1)
    pid = bridge.pid
    for _, payload in BAD_INPUTS:
        publisher.publish(payload)
    publisher.publish(
        {
            "tipo_mensaje": "alarmas",
            "tipo_alarma": "X",
            "descripcion": "rechazada",
            "empresa": "funza",
        }
    )
    t0 = time.time()
    publisher.publish(
        {
            "tipo_mensaje": "alarmas",
            "tipo_alarma": "CRITICA",
            "descripcion": "ok",
            "empresa": "cota",
        }
    )
    (ok,) = wait_until(
        lambda: [a for a in backend.alerts() if a["payload"].get("descripcion") == "ok"],
        10,
        "valid alarm",
    )
    stored_at = datetime.fromisoformat(ok["received_at"].replace("Z", "+00:00")).timestamp()
    assert stored_at - t0 < 1.0  # publish to stored at the backend (same clock)
    assert bridge.running()
    assert bridge.pid == pid
    n = len(BAD_INPUTS) + 1
    entries = wait_until(
        lambda: d if len(d := dead_letters(bridge)) >= n else None, 10, f"{n} dead letters"
    )
    reasons = {e["reason"] for e in entries}
    assert {r for r, _ in BAD_INPUTS} <= reasons
    assert "backend_422" in reasons
    code, body = bridge.http("/metrics")
    text = body.decode()
    for reason in {r for r, _ in BAD_INPUTS}:
        count = sum(1 for r, _ in BAD_INPUTS if r == reason)
        assert f'botonera_dead_letters_total{{reason="{reason}"}} {count}.0' in text
    log = bridge.log_text()
    for reason, _ in BAD_INPUTS:
        assert reason in log


def test_check_config(bridge_factory, tmp_path, mosquitto):
    bridge = bridge_factory()
    ok = bridge.cli("check-config", "--offline")
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nbroker = "x"\nbrokr = "typo"\n')
    res = subprocess.run(
        [*bridge.argv, "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        env=bridge.env,
    )
    assert res.returncode == 2
    assert "mqtt.brokr" in res.stderr
    assert str(bad) in res.stderr
    canary = "CANARY-s3cr3t-Pw"
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[mqtt]\nbroker = "127.0.0.1"\nport = 1\npassword = "{canary}"\n'
        f'[backend]\ntoken = "{canary}"\n[redis]\nurl = ""\n[websocket]\nurl = ""\n'
    )
    res = subprocess.run(
        [*bridge.argv, "check-config", "--config", str(conf)],
        capture_output=True,
        text=True,
        env=bridge.env,
        timeout=60,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "✗ broker MQTT" in res.stdout
    assert "✓" in res.stdout
    assert canary not in res.stdout + res.stderr
    good = subprocess.run(
        [*bridge.argv, "check-config", "--config", str(bridge.config)],
        capture_output=True,
        text=True,
        env=bridge.env,
        timeout=60,
    )
    assert "✓ broker MQTT" in good.stdout, good.stdout
    env_secret = subprocess.run(
        [*bridge.argv, "check-config", "--offline", "--config", str(bridge.config)],
        capture_output=True,
        text=True,
        env={**bridge.env, "MQTT_PASSWORD": canary},
        timeout=60,
    )
    assert env_secret.returncode == 0
    assert canary not in env_secret.stdout + env_secret.stderr


def test_send_test_ok_and_bridge_down(bridge_factory, redis_server):
    bridge = bridge_factory(redis_url=redis_server.url).start()
    res = bridge.cli("send-test", "--empresa", "cota", "--timeout", "20")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout
    quiet = bridge.cli("send-test", "--empresa", "cota", "--quiet", "--timeout", "20")
    assert quiet.returncode == 0
    assert quiet.stdout == ""
    bridge.terminate()
    t0 = time.monotonic()
    down = bridge.cli("send-test", "--empresa", "cota", "--timeout", "3")
    assert down.returncode == 1
    assert time.monotonic() - t0 < 3 + 5
    assert "bridge down" in down.stderr


def test_send_test_broker_unreachable(bridge_factory, mosquitto):
    bridge = bridge_factory()
    mosquitto.kill()
    res = bridge.cli("send-test", "--empresa", "cota", "--timeout", "3")
    assert res.returncode == 1
    assert "broker unreachable" in res.stderr


def test_sigterm_under_load_exits_0_and_loses_nothing(
    bridge_factory, backend, publisher, redis_server
):
    bridge = bridge_factory(redis_url=redis_server.url).start()
    backend.fault(delay=0.01)
    msgs = [
        {"tipo_mensaje": "alarmas", "tipo_alarma": "C", "empresa": "cota", "seq": i}
        for i in range(1000)
    ]
    for m in msgs:
        publisher.publish(m)
    time.sleep(0.5)
    t0 = time.monotonic()
    assert bridge.terminate(timeout=20) == 0
    assert time.monotonic() - t0 < 15
    backend.clear_fault()
    bridge.start()
    wait_until(
        lambda: {a["payload"]["seq"] for a in backend.alerts()} >= set(range(1000)),
        60,
        "all 1000 seqs",
    )


def test_log_lines_carry_event_fields(bridge_factory, publisher, backend):
    bridge = bridge_factory(conf={"log": {"format": "json"}}).start()
    publisher.publish(
        {"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "empresa": "cota", "id": "abc"}
    )
    wait_until(lambda: backend.alerts(), 10, "alert")
    lines = [json.loads(ln) for ln in bridge.log_text().splitlines() if ln.startswith("{")]
    delivered = [ln for ln in lines if "delivered to backend" in ln["msg"]]
    assert delivered
    assert "empresa=cota" in delivered[0]["msg"]
    assert "tipo=alarmas" in delivered[0]["msg"]


def test_sigint_is_clean_too(bridge_factory):
    bridge = bridge_factory().start()
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGINT)
    assert bridge.proc.wait(20) == 0


def drained(inv: dict) -> dict | None:
    return inv if all(r["queued_or_in_flight"] == 0 for r in inv.values()) else None


def dead_letters(bridge: BridgeProc) -> list[dict]:
    out = bridge.cli("dead-letters", "list", "--json", "--limit", "100")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_verify_unknown_empresa_dead_lettered_central_told(bridge_factory, backend, publisher):
    bridge = bridge_factory(
        conf={
            "backend": {"verify": True},
            "central": ["+573009990000"],
            "empresas": [{"id": "zipaquira", "nombre": "Zipaquirá"}],
        }
    ).start()
    # zipaquira is configured here but unknown to the backend (it knows the four built-ins)
    publisher.publish({"tipo_mensaje": "alarmas", "tipo_alarma": "C", "empresa": "zipaquira"})
    publisher.publish(
        {"tipo_mensaje": "alarmas", "tipo_alarma": "C", "empresa": "cota", "id": "v1"}
    )
    wait_until(lambda: backend.alerts(), 10, "cota alarm forwarded")
    wait_until(
        lambda: "El backend no reconoce la empresa «zipaquira»" in bridge.log_text(),
        10,
        "central told",
    )
    assert [a["empresa"] for a in backend.alerts()] == ["cota"]
    code, body = bridge.http("/metrics")
    assert 'botonera_dead_letters_total{reason="unknown_empresa"} 1.0' in body.decode()
    # fail open: with the verify endpoint broken, alarms still go through
    backend.fault(status=503, target="verify")
    publisher.publish(
        {"tipo_mensaje": "alarmas", "tipo_alarma": "C", "empresa": "funza", "id": "v2"}
    )
    wait_until(
        lambda: any(a["empresa"] == "funza" for a in backend.alerts()), 10, "funza forwarded"
    )


def test_alerts_and_publish_cli(bridge_factory, backend):
    bridge = bridge_factory().start()
    res = bridge.cli(
        "publish",
        "--tipo",
        "alarmas",
        "--empresa",
        "cota",
        "--campo",
        "descripcion=Puerta",
        "--campo",
        "n=3",
    )
    assert res.returncode == 0, res.stderr
    wait_until(lambda: backend.alerts(), 10, "published alarm stored")
    alert = backend.alerts()[0]
    assert alert["payload"]["descripcion"] == "Puerta"
    assert alert["payload"]["n"] == 3
    listed = bridge.cli("alerts", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)
    assert items[0]["payload"]["descripcion"] == "Puerta"
    shown = bridge.cli("alerts", "show", str(items[0]["id"]))
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["id"] == items[0]["id"]
    missing = bridge.cli("alerts", "show", "999999")
    assert missing.returncode == 1
