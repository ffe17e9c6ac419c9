"""Receipts end to end through the real bridge process: the Cloud API both ways (signed
webhooks in, pair-rate test server out) and WAHA ``message.ack`` over the WebSocket."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from tests.servers.whatsapp_api import FakeWhatsApp
from tests.support.bridge import BridgeProc, wait_until
from tests.support.gateway import GatewayProc
from tests.support.webhook import MetaWebhook

ANA = "+573001112233"
BETO = "+573004445566"
CENTRAL = "+573009990000"
SECRET = "test-app-secret-3f9a"  # noqa: S105 - a test value
VERIFY = "test-verify-token-77"  # noqa: S105 - a test value
STATUS_TOKEN = "test-status-token-1"  # noqa: S105 - a test value
CHROMIUM = (
    "/usr/bin/chromium"  # the page check runs where CI installs it (apt-get install chromium)
)


@pytest.fixture
def wa():
    server = FakeWhatsApp()
    yield server
    server.close()


def texts_to(wa: FakeWhatsApp, number: str) -> list[str]:
    digits = number.lstrip("+")
    return [
        r.json["text"]["body"]
        for r in wa.requests()
        if r.status < 300 and isinstance(r.json, dict) and r.json.get("to") == digits
    ]


def open_alarm(bridge: BridgeProc, token: str = "") -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        code, body = bridge.http("/api/status", token)
        assert code == 200, body
        for e in json.loads(body)["empresas"]:
            if e["id"] == "cota" and e["alarms"]:
                return e["alarms"][0]
        return None

    return wait_until(find, 10, "the alarm on the board")


def timeline(bridge: BridgeProc, event_id: str, token: str = "") -> dict[str, Any]:
    code, body = bridge.http(f"/api/alarms/{event_id}", token)
    assert code == 200, body
    return json.loads(body)


def page_dom(bridge: BridgeProc, tmp_path: Path) -> str:
    url = f"http://127.0.0.1:{bridge.status_port}/?token={STATUS_TOKEN}"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000",
        "--dump-dom", url,
    ]  # fmt: skip
    env = dict(os.environ, HOME=str(tmp_path))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_cloud_api_both_ways(bridge_factory, backend, wa, publisher, tmp_path):
    """Must-show 10.7."""
    bridge = bridge_factory(
        conf={
            "whatsapp": {
                "provider": "cloud",
                "api_url": wa.url,
                "phone_number_id": "1055",
                "token": "wa-tok",
                "app_secret": SECRET,
                "verify_token": VERIFY,
            },
            "status": {"token": STATUS_TOKEN},
            "central": [CENTRAL],
            "empresas": [{"id": "cota", "nombre": "Cota", "contactos": [ANA, BETO]}],
        }
    ).start()
    meta = MetaWebhook(f"http://127.0.0.1:{bridge.status_port}", SECRET)

    # Meta's verification: no status token needed, the verify token decides
    assert meta.verify(VERIFY, "1158201444") == (200, b"1158201444")
    assert meta.verify("wrong", "1158201444")[0] == 403

    publisher.publish(
        {
            "tipo_mensaje": "alarmas",
            "tipo_alarma": "CRITICA",
            "descripcion": "Incendio bodega",
            "empresa": "cota",
            "sede": "principal",
        }
    )
    sent = wait_until(
        lambda: len({n for n, _ in wa.sent_ids()}) >= 2 and wa.sent_ids(), 10, "A and B reached"
    )
    msg_of = {number: mid for number, mid in sent}
    alarm = open_alarm(bridge, STATUS_TOKEN)
    event_id = alarm["id"]

    a_digits, b_digits = ANA.lstrip("+"), BETO.lstrip("+")
    assert meta.status(msg_of[a_digits], "delivered", a_digits)[0] == 200
    assert meta.status(msg_of[a_digits], "read", a_digits)[0] == 200

    # the status page in a real browser: the open alarm's reached / read / taken line
    if os.access(CHROMIUM, os.X_OK):
        wait_until(lambda: open_alarm(bridge, STATUS_TOKEN).get("read_by") == 1, 5, "read")
        dom = page_dom(bridge, tmp_path)
        assert 'data-testid="alarm-reach">avisados 2 · leído por 1 · sin atender<' in dom

    # an ACK with a wrong signature: 403 and nothing happens
    ack_id = "wamid.HBgMNTczMDA0NDQ1NTY2FQIAEhggQUNLMDAwMDAx"
    assert meta.message(ack_id, b_digits, "ACK", secret="not-the-secret")[0] == 403  # noqa: S106
    time.sleep(3)
    assert not [a for a in backend.alerts() if a["tipo_mensaje"] == "acuse"]
    assert not [t for t in texts_to(wa, ANA) if "atendida" in t]
    assert timeline(bridge, event_id, STATUS_TOKEN)["ack"] is None

    # the same ACK correctly signed
    t0 = time.monotonic()
    assert meta.message(ack_id, b_digits, "ACK")[0] == 200
    acuse = backend.wait_for(
        lambda: [a for a in backend.alerts() if a["tipo_mensaje"] == "acuse"], 8, what="acuse"
    )
    assert acuse[0]["payload"]["alarma_id"] == event_id
    told = wait_until(
        lambda: [t for t in texts_to(wa, ANA) if "atendida por +57******5566" in t],
        8 - (time.monotonic() - t0),
        "A told who took it",
    )
    assert told

    # Meta retries a callback it thinks failed: the same message id is handled once
    assert meta.message(ack_id, b_digits, "ACK")[0] == 200
    time.sleep(1)
    assert len([a for a in backend.alerts() if a["tipo_mensaje"] == "acuse"]) == 1
    assert len([t for t in texts_to(wa, BETO) if "marcada como atendida" in t]) == 1

    data = timeline(bridge, event_id, STATUS_TOKEN)
    by_number = {r["number"]: r for r in data["recipients"]}
    assert by_number["+57******2233"]["status"] == "read"
    assert by_number["+57******2233"]["delivered_at"] is not None
    assert by_number["+57******5566"]["status"] in ("sent", "delivered", "read")
    assert data["ack"]["by"] == "+57******5566"
    assert data["backend"]["accepted"] is True
    assert (data["reached"], data["read_by"]) == (2, 1)
    reach = open_alarm(bridge, STATUS_TOKEN)
    assert (reach["reached"], reach["read_by"]) == (2, 1)
    # the timeline needs the status token; the webhook does not
    assert bridge.http(f"/api/alarms/{event_id}")[0] == 401

    # `botonera-bridge timeline <id>` prints it in Spanish
    out = bridge.cli("timeline", event_id, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "leído por +57******2233" in out.stdout
    assert "atendida por +57******5566" in out.stdout
    assert "Resumen: avisados 2 · leído por 1 · atendida por +57******5566" in out.stdout
    missing = bridge.cli("timeline", "no-such-alarm", timeout=30)
    assert missing.returncode == 1
    assert "no conoce la alarma" in missing.stderr

    config = bridge.cli("check-config", "--offline", timeout=30)
    assert config.returncode == 0, config.stderr
    assert SECRET not in config.stdout
    assert VERIFY not in config.stdout
    log = bridge.log_text()
    assert SECRET not in log
    assert "HBgMNTczMDA0NDQ1NTY2" not in log  # Cloud ids carry the number base64-encoded
    for number in (ANA, BETO):
        assert number.lstrip("+") not in log
        assert number.lstrip("+") not in out.stdout
    assert bridge.running()


def test_waha_read_receipt_shows_in_the_timeline(bridge_factory, wa, publisher):
    """Must-show 10.8."""
    gateway = GatewayProc()
    try:
        bridge = bridge_factory(
            conf={
                "whatsapp": {"provider": "waha", "api_url": wa.url, "token": "waha-key"},
                "websocket": {"url": gateway.url, "reconnect_delay": 0.2},
                "empresas": [{"id": "cota", "nombre": "Cota", "contactos": [ANA]}],
            }
        ).start()
        wait_until(lambda: bridge.status()["components"]["websocket"]["up"], 10, "gateway up")
        publisher.publish(
            {"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "empresa": "cota", "sede": "sur"}
        )
        ((number, mid),) = wait_until(wa.sent_ids, 10, "the alarm sent through WAHA")
        assert number == ANA.lstrip("+")
        event_id = open_alarm(bridge)["id"]
        ack = {
            "event": "message.ack",
            "session": "default",
            "payload": {
                "id": mid,
                "from": "573000000000@c.us",
                "to": f"{ANA.lstrip('+')}@c.us",
                "fromMe": True,
                "ack": 3,
                "ackName": "READ",
            },
        }
        assert gateway.send(ack) == 1

        def read() -> dict[str, Any] | None:
            data = timeline(bridge, event_id)
            return data if data["read_by"] == 1 else None

        data = wait_until(read, 5, "the READ receipt in the timeline")
        (recipient,) = data["recipients"]
        assert recipient["status"] == "read"
        assert recipient["number"] == "+57******2233"
        assert ANA.lstrip("+") not in bridge.log_text()
    finally:
        gateway.close()
