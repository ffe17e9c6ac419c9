"""Issue 9, must-show 1 (the gateway part): poison WebSocket frames never end or stall
the bridge. The real bridge process, the gateway test server, mosquitto, the backend."""

from __future__ import annotations

import re
import time

from tests.support.bridge import wait_until
from tests.support.gateway import GatewayProc

CONTACT = "+573001112233"
STRANGER = "+573009998877"


def test_poison_frames_then_estado_and_an_alarm(bridge_factory, backend, publisher):
    gateway = GatewayProc()
    try:
        bridge = bridge_factory(
            conf={
                "websocket": {"url": gateway.url, "reconnect_delay": 0.2},
                "empresas": [{"id": "cota", "nombre": "Cota", "contactos": [CONTACT]}],
            }
        ).start()
        pid = bridge.pid
        wait_until(lambda: bridge.status()["components"]["websocket"]["up"], 10, "gateway up")

        t0 = time.monotonic()
        assert gateway.poison(CONTACT.lstrip("+"), STRANGER.lstrip("+")) == 8
        # provider "log": the reply is a log line with the number masked
        wait_until(
            lambda: "WhatsApp → +57******2233: 📋 *Cota*" in bridge.log_text(),
            10,
            "the ESTADO answered",
        )
        assert time.monotonic() - t0 < 10
        assert bridge.running()
        assert bridge.pid == pid

        published = time.monotonic()
        publisher.publish(
            {"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "empresa": "cota", "id": 1}
        )
        backend.wait_for(
            lambda: [a for a in backend.alerts() if a["tipo_mensaje"] == "alarmas"],
            5,
            what="the alarm after the poison",
        )
        assert time.monotonic() - published < 5

        code, metrics = bridge.http("/metrics")
        assert code == 200
        text = metrics.decode()
        rejected = {
            m.group(1): float(m.group(2))
            for m in re.finditer(
                r'botonera_rejected_total\{reason="([a-z_]+)",source="websocket"\} (\S+)', text
            )
        }
        assert sum(rejected.values()) == 7, rejected
        assert rejected["invalid_schema"] >= 4  # payload, event, body, the two huge timestamps
        assert bridge.running()
        assert bridge.pid == pid
        log = bridge.log_text()
        assert "Traceback" not in log
        for number in (CONTACT, STRANGER):
            assert number.lstrip("+") not in log
        # each malformed frame is one log line with its reason, never a raw frame
        assert log.count("malformed frame from gateway") == 7
        assert "\n{" not in log
    finally:
        gateway.close()
