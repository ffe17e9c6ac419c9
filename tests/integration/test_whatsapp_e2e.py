"""WhatsApp both ways through the real bridge process: Cloud API out, WAHA gateway in."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from tests.servers.whatsapp_api import FakeWhatsApp
from tests.support.bridge import BridgeProc, wait_until
from tests.support.gateway import GatewayProc, waha

from botonera_bridge.ids import mask_phone, message_ref

ANA = "+573001112233"
BETO = "+573004445566"
CENTRAL = "+573009990000"
STRANGER = "573007778888"


@pytest.fixture
def wa():
    server = FakeWhatsApp()
    yield server
    server.close()


@pytest.fixture
def gateway():
    gw = GatewayProc()
    yield gw
    gw.close()


@pytest.fixture
def wa_bridge(bridge_factory, wa, gateway):
    """bridge_factory with the Cloud API fake, the gateway and cota's two contacts."""

    def make(conf=None, **kw):
        base = {
            "whatsapp": {
                "provider": "cloud",
                "api_url": wa.url,
                "phone_number_id": "1055",
                "token": "wa-tok",
            },
            "websocket": {"url": gateway.url, "reconnect_delay": 0.2},
            "central": [CENTRAL],
            "empresas": [{"id": "cota", "nombre": "Cota", "contactos": [ANA, BETO]}],
        }
        for k, v in (conf or {}).items():
            base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
        return bridge_factory(conf=base, **kw)

    return make


def sent_to(wa: FakeWhatsApp, number: str) -> list[tuple[float, str]]:
    digits = number.lstrip("+")
    return [
        (r.at, r.json["text"]["body"])
        for r in wa.requests()
        if r.status < 300
        and isinstance(r.json, dict)
        and r.json.get("to") == digits
        and "text" in r.json
    ]


def wait_ws(bridge: BridgeProc) -> None:
    wait_until(lambda: bridge.status()["components"]["websocket"]["up"], 10, "gateway connected")


def test_cloud_delivery_within_1s_and_log_masked(wa_bridge, wa, publisher):
    bridge = wa_bridge().start()
    t0 = time.monotonic()
    publisher.publish(
        {
            "tipo_mensaje": "alarmas",
            "tipo_alarma": "CRITICA",
            "descripcion": "Fallo en sistema",
            "empresa": "cota",
        }
    )
    (at, text), *_ = wait_until(lambda: sent_to(wa, ANA), 5, "message to Ana")
    assert at - t0 < 1.0, at - t0
    assert "Cota" in text
    assert "Fallo en sistema" in text
    req = next(r for r in wa.requests() if r.json.get("to") == ANA.lstrip("+"))
    assert req.path == "/v21.0/1055/messages"
    assert req.headers["authorization"] == "Bearer wa-tok"
    assert req.json["messaging_product"] == "whatsapp"
    assert req.json["type"] == "text"
    time.sleep(0.5)
    assert len(sent_to(wa, ANA)) == 1
    assert "573001112233" not in bridge.log_text()
    assert "wa-tok" not in bridge.log_text()


def test_whatsapp_independent_of_backend(wa_bridge, wa, publisher, backend, redis_server):
    backend.fault(status=503, seconds=600)
    wa_bridge(redis_url=redis_server.url).start()
    t0 = time.monotonic()
    publisher.publish(
        {
            "tipo_mensaje": "alarmas",
            "tipo_alarma": "CRITICA",
            "descripcion": "sin backend",
            "empresa": "cota",
        }
    )
    (at, text), *_ = wait_until(lambda: sent_to(wa, ANA), 5, "message to Ana")
    assert at - t0 < 1.0
    assert "sin backend" in text
    assert backend.alerts() == []


def test_identical_alarms_coalesce(wa_bridge, wa, publisher):
    wa_bridge().start()
    alarm = {
        "tipo_mensaje": "alarmas",
        "tipo_alarma": "CRITICA",
        "descripcion": "Humo",
        "empresa": "cota",
    }
    for _ in range(10):
        publisher.publish(alarm)
    wait_until(lambda: sent_to(wa, ANA), 5, "message to Ana")
    time.sleep(2)
    msgs = sent_to(wa, ANA)
    assert len(msgs) == 1, msgs
    assert "×10" in msgs[0][1]


def test_template_message(wa_bridge, wa, publisher):
    wa_bridge(conf={"whatsapp": {"template": "alerta_botonera"}}).start()
    publisher.publish(
        {
            "tipo_mensaje": "alarmas",
            "tipo_alarma": "CRITICA",
            "descripcion": "Gas",
            "empresa": "cota",
        }
    )
    req = wait_until(
        lambda: [r for r in wa.requests() if r.json.get("type") == "template"], 5, "template"
    )[0]
    assert req.json["template"]["name"] == "alerta_botonera"
    assert req.json["template"]["language"]["code"] == "es"
    params = [p["text"] for p in req.json["template"]["components"][0]["parameters"]]
    assert params[0] == "Cota"
    assert any("Gas" in p for p in params)


def test_estado_authorized_and_stranger(wa_bridge, wa, publisher, gateway, backend):
    bridge = wa_bridge().start()
    wait_ws(bridge)
    publisher.publish(
        {
            "tipo_mensaje": "heartbeat",
            "empresa": "cota",
            "sede": "principal",
            "dispositivo": "panel1",
        }
    )
    publisher.publish(
        {
            "tipo_mensaje": "semaforos",
            "tipo_alarma": "VERDE",
            "empresa": "cota",
            "sede": "principal",
            "dispositivo": "panel1",
        }
    )
    wait_until(lambda: backend.alerts(), 5, "semaforo at backend")
    gateway.send(waha("false_x_1", ANA.lstrip("+"), "estado"))
    gateway.send(waha("false_x_2", STRANGER, "ESTADO"))
    replies = wait_until(
        lambda: [t for _, t in sent_to(wa, ANA) if "panel1" in t],
        12,
        "ESTADO reply (behind the 6 s spacing)",
    )
    time.sleep(1.0)
    assert len([t for _, t in sent_to(wa, ANA) if "panel1" in t]) == 1
    assert "Cota" in replies[0]
    assert "VERDE" in replies[0]
    assert sent_to(wa, "+" + STRANGER) == []
    log = bridge.log_text()
    assert STRANGER not in log
    code, body = bridge.http("/metrics")
    assert 'botonera_whatsapp_ignored_total{reason="unauthorized"} 1.0' in body.decode()


def test_ack_flow_stops_escalation(wa_bridge, wa, publisher, gateway, backend):
    bridge = wa_bridge(conf={"escalation": {"after": 2, "max": 3}}).start()
    wait_ws(bridge)
    publisher.publish(
        {
            "tipo_mensaje": "alarmas",
            "tipo_alarma": "CRITICA",
            "descripcion": "Incendio",
            "empresa": "cota",
        }
    )
    wait_until(lambda: sent_to(wa, ANA) and sent_to(wa, BETO), 5, "alarm to both contacts")
    gateway.send(waha("false_ack_1", ANA.lstrip("+"), "Recibido"))
    wait_until(lambda: [t for _, t in sent_to(wa, BETO) if "atendida por" in t], 10, "Beto told")
    acuse = wait_until(
        lambda: [a for a in backend.alerts() if a["tipo_mensaje"] == "acuse"], 5, "acuse"
    )[0]
    assert acuse["payload"]["empresa"] == "cota"
    assert acuse["payload"]["_bridge"]["origen"] == "whatsapp"
    time.sleep(5)  # two escalation periods
    everything = [t for r in wa.requests() for t in [json.dumps(r.json, ensure_ascii=False)]]
    assert not any("SIN ATENDER" in t for t in everything), everything
    assert sent_to(wa, CENTRAL) == []


def test_escalation_without_ack_real_time(wa_bridge, wa, publisher, gateway):
    wa_bridge(conf={"escalation": {"after": 2, "max": 1}}).start()
    publisher.publish(
        {
            "tipo_mensaje": "alarmas",
            "tipo_alarma": "CRITICA",
            "descripcion": "Nadie",
            "empresa": "cota",
        }
    )
    wait_until(
        lambda: [t for _, t in sent_to(wa, CENTRAL) if "SIN ATENDER" in t],
        10,
        "escalation to central",
    )


def test_semaforo_command_publishes_and_reconnect_dedups(wa_bridge, wa, gateway, mosquitto):
    got: list[dict] = []
    ready = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="cmd-watcher")
    sub.on_connect = lambda c, *a: (c.subscribe("comandos/#", 1), ready.set())
    sub.on_message = lambda c, u, m: got.append({"topic": m.topic, **json.loads(m.payload)})
    sub.connect("127.0.0.1", mosquitto.port)
    sub.loop_start()
    try:
        assert ready.wait(5)
        bridge = wa_bridge().start()
        wait_ws(bridge)
        colors = ["ROJO", "AMARILLO", "VERDE"]
        frames = [
            waha(f"false_sem_{i}", ANA.lstrip("+"), f"semáforo {c.lower()}")
            for i, c in enumerate(colors)
        ]
        gateway.send(frames[0])
        wait_until(lambda: len(got) >= 1, 10, "first command")
        for _ in range(2):  # the gateway drops us twice and resends everything it has
            gateway.drop()
            wait_until(lambda: gateway.clients()["clients"] >= 1, 15, "receiver reconnected")
            for f in frames:
                gateway.send(f)
        wait_until(lambda: len(got) >= 3, 15, "three commands")
        time.sleep(1.5)
        assert [g["tipo_alarma"] for g in got] == colors
        assert all(g["topic"] == "comandos/cota" and g["tipo_mensaje"] == "semaforos" for g in got)
        assert gateway.clients()["accepted"] >= 3
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_inbound_exactly_once_in_order_through_redis_loss(
    wa_bridge, gateway, mosquitto, redis_server
):
    carla = "+573002223344"
    senders = [ANA, BETO, carla]
    got: list[dict] = []
    ready = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="cmd-watcher-2")
    sub.on_connect = lambda c, *a: (c.subscribe("comandos/#", 1), ready.set())
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.connect("127.0.0.1", mosquitto.port)
    sub.loop_start()
    try:
        assert ready.wait(5)
        bridge = wa_bridge(
            redis_url=redis_server.url,
            conf={"empresas": [{"id": "cota", "nombre": "Cota", "contactos": senders}]},
        ).start()
        wait_ws(bridge)
        pid = bridge.pid
        colors = ["ROJO", "AMARILLO", "VERDE", "NARANJA", "AZUL"]
        sent: dict[str, list[str]] = {s: [] for s in senders}
        restarted_at = None
        for i in range(300):
            sender = senders[i % 3]
            mid = f"false_{sender[1:]}@c.us_{i:04d}"
            gateway.send(waha(mid, sender.lstrip("+"), f"SEMAFORO {colors[i % 5]}"))
            sent[sender].append(mid)
            if i == 100:
                redis_server.kill()
                killed_at = time.monotonic()
            if restarted_at is None and i > 100 and time.monotonic() - killed_at >= 5:
                redis_server.start()
                restarted_at = time.monotonic()
            time.sleep(0.1)
        assert restarted_at is not None
        wait_until(lambda: len(got) >= 300, 30, "300 commands")
        time.sleep(2)
        refs = [g["ref"] for g in got]
        assert len(refs) == 300
        assert len(set(refs)) == 300
        for s in senders:  # por and ref are masked (no full number leaves to the panels)
            mine = [g["ref"] for g in got if g["por"] == mask_phone(s)]
            assert mine == [message_ref(m) for m in sent[s]], f"order broken for {s[:5]}…"
        assert bridge.running()
        assert bridge.pid == pid
        assert "fall back to memory" in bridge.log_text()
    finally:
        sub.loop_stop()
        sub.disconnect()
