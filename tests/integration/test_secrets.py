"""Issue 9 must-show 7: canaries as every kind of secret, inside URLs too, never show in
the DEBUG log, /api/status, /readyz, /metrics nor check-config."""

from __future__ import annotations

import socket
import time

from tests.servers.whatsapp_api import FakeWhatsApp
from tests.support.bridge import wait_until
from tests.support.procs import Redis, free_port

CANARY = "CANARY"  # every secret below contains it


class PasswordRedis(Redis):
    """A private redis-server that requires a password (`requirepass`)."""

    def __init__(self, password: str) -> None:
        super().__init__(appendonly=False)
        self.password = password

    def argv(self) -> list[str]:
        return [*super().argv(), "--requirepass", self.password]

    def start(self) -> None:
        super(Redis, self).start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"-NOAUTH"):
                    return
            time.sleep(0.05)
        raise TimeoutError("redis with requirepass did not answer")


def test_no_secret_anywhere(bridge_factory, backend, publisher, server_binaries):
    redis = PasswordRedis(f"redis-pw-{CANARY}-1")
    redis.start()
    try:
        with FakeWhatsApp() as wa:
            _run(bridge_factory, backend, publisher, redis, wa)
    finally:
        redis.cleanup()


def _run(bridge_factory, backend, publisher, redis, wa) -> None:
    host = backend.url.removeprefix("http://")
    status_token = f"status-{CANARY}-2"
    bridge = bridge_factory(
        backend_url=f"http://botonera:backend-pw-{CANARY}-3@{host}",
        redis_url=f"redis://:{redis.password}@127.0.0.1:{redis.port}/0",
        conf={
            "log": {"level": "DEBUG"},
            "mqtt": {"username": "bridge"},
            "websocket": {"url": f"ws://127.0.0.1:{free_port()}/ws?x-api-key=ws-key-{CANARY}-4"},
            "whatsapp": {"provider": "cloud", "api_url": wa.url, "phone_number_id": "123"},
            "empresas": [{"id": "cota", "contactos": ["+573001110001"]}],
        },
        env={
            "MQTT_PASSWORD": f"mqtt-pw-{CANARY}-5",
            "BACKEND_TOKEN": f"backend-token-{CANARY}-6",
            "STATUS_TOKEN": status_token,
            "WHATSAPP_TOKEN": f"wa-token-{CANARY}-7",
        },
    ).start()
    publisher.publish(
        {"tipo_mensaje": "alarmas", "empresa": "cota", "seq": 1, "descripcion": "secretos"}
    )
    alerts = wait_until(lambda: backend.alerts(), 10, "the alarm at the backend")
    assert alerts[0]["payload"]["descripcion"] == "secretos"
    wait_until(lambda: wa.requests(), 10, "the alarm at WhatsApp")
    # the secrets were really used (so the test would see them leak)
    assert backend.requests()[0]["authorization"] == f"Bearer backend-token-{CANARY}-6"
    assert CANARY in wa.requests()[0].headers.get("authorization", "")
    # a few WebSocket reconnect attempts, Redis up, MQTT up
    wait_until(lambda: bridge.log_text().count("ws://") >= 2 or time.sleep(0.5), 10, "ws retries")
    status_code, status = bridge.http("/api/status", status_token)
    assert status_code == 200
    assert b'"memory_fallback":false' in status.replace(b" ", b"")  # Redis with its password
    outputs = {
        "/api/status": status,
        "/readyz": bridge.http("/readyz", status_token)[1],
        "/metrics": bridge.http("/metrics", status_token)[1],
    }
    check = bridge.cli("check-config", timeout=60)
    outputs["check-config"] = (check.stdout + check.stderr).encode()
    assert "****" in check.stdout
    assert bridge.terminate() == 0
    outputs["log"] = bridge.log_text().encode()
    leaks = {where: text.count(CANARY.encode()) for where, text in outputs.items()}
    assert leaks == dict.fromkeys(outputs, 0), leaks
