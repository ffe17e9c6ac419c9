"""The reference backend over real HTTP, and the mosquitto/redis process fixtures."""

from __future__ import annotations

import socket
import time
import urllib.error
from collections.abc import Callable
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import trio
from paho.mqtt.enums import CallbackAPIVersion
from tests.support.backend import Backend
from tests.support.procs import Mosquitto, Redis, pid_alive

TOKEN = "s3cret"  # noqa: S105 - a test token
ALARMA = {"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "descripcion": "Fallo en sistema"}


def alarma(empresa: str, n: int = 0) -> dict[str, Any]:
    return {
        **ALARMA,
        "empresa": empresa,
        "seq": n,
        "_bridge": {
            "id": f"ev-{empresa}-{n}",
            "topic": f"empresas/{empresa}",
            "recibido_en": "2024-01-01T12:00:00Z",
            "origen": "mqtt",
        },
    }


# --- contract ------------------------------------------------------------------------------


def test_store_list_show(backend: Backend) -> None:
    status, body = backend.post_alert(alarma("cota", 1), key="k1")
    assert status == 201
    assert body == {"id": 1, "status": "created"}
    assert backend.post_alert(alarma("funza", 2), key="k2")[0] == 201
    assert backend.post_alert(alarma("cota", 3), key="k3")[0] == 201

    status, listed, _ = backend.call("GET", "/api/mqtt-alerts")
    assert status == 200
    assert [a["idempotency_key"] for a in listed] == ["k3", "k2", "k1"]  # newest first
    first = listed[-1]
    assert set(first) == {"id", "idempotency_key", "empresa", "tipo_mensaje", "received_at",
                          "payload"}  # fmt: skip
    assert first["empresa"] == "cota"
    assert first["tipo_mensaje"] == "alarmas"
    assert first["payload"] == alarma("cota", 1)  # stored unchanged, _bridge included
    assert first["received_at"].endswith("Z")

    _, cota, _ = backend.call("GET", "/api/mqtt-alerts?empresa=cota&limit=1")
    assert [a["idempotency_key"] for a in cota] == ["k3"]
    assert backend.call("GET", "/api/mqtt-alerts?limit=x")[0] == 400

    status, one, _ = backend.call("GET", f"/api/mqtt-alerts/{first['id']}")
    assert (status, one) == (200, first)
    assert backend.call("GET", "/api/mqtt-alerts/999")[0] == 404
    assert backend.call("GET", "/api/mqtt-alerts/abc")[0] == 404

    assert [a["idempotency_key"] for a in backend.alerts()] == ["k1", "k2", "k3"]
    reqs = backend.requests()
    assert [r["status"] for r in reqs] == [201, 201, 201]
    assert reqs[0]["user_agent"] == "tests/1"
    assert reqs[0]["content_type"] == "application/json"
    assert reqs[0]["payload"] == alarma("cota", 1)
    log = backend.log_text()
    assert f"listening on http://127.0.0.1:{backend.port}" in log
    assert log.count("POST /api/mqtt-alerts/process 201") == 3


def test_duplicate_key_is_not_a_new_alert(backend: Backend) -> None:
    assert backend.post_alert(alarma("cota"), key="same") == (201, {"id": 1, "status": "created"})
    status, body = backend.post_alert(alarma("cota"), key="same")
    assert status == 200
    assert body["duplicate"] is True
    assert body["id"] == 1
    assert len(backend.alerts()) == 1
    assert [r["status"] for r in backend.requests()] == [201, 200]


def test_bad_requests_are_400_and_recorded(backend: Backend) -> None:
    assert backend.post_alert(alarma("cota"))[0] == 400  # no Idempotency-Key
    assert backend.post_alert([1, 2], key="a")[0] == 400  # not an object
    status, _, _ = backend.call("POST", "/api/mqtt-alerts/process", None, {"Idempotency-Key": "b"})
    assert status == 400  # empty body
    assert backend.alerts() == []
    assert [r["status"] for r in backend.requests()] == [400, 400, 400]
    assert backend.call("GET", "/nope")[0] == 404
    assert backend.call("POST", "/_test/fault", {"bogus": 1})[0] == 400


def test_503_window_then_recovery(backend: Backend) -> None:
    backend.fault(status=503, seconds=1.0, retry_after=2)
    status, _, headers = backend.call(
        "POST", "/api/mqtt-alerts/process", alarma("cota"), {"Idempotency-Key": "r1"}
    )
    assert status == 503
    assert headers["Retry-After"] == "2"
    assert backend.post_alert(alarma("funza"), key="r2")[0] == 503  # every empresa
    assert backend.alerts() == []  # refused requests store nothing

    backend.wait_for(lambda: backend.post_alert(alarma("cota"), key="r1")[0] == 201, timeout=5)
    assert [a["idempotency_key"] for a in backend.alerts()] == ["r1"]
    statuses = [r["status"] for r in backend.requests()]
    assert statuses[:2] == [503, 503]
    assert statuses[-1] == 201
    assert set(statuses[2:-1]) <= {503}
    assert backend.faults() == []  # expired


def test_422_for_one_empresa_only(backend: Backend) -> None:
    backend.fault(status=422, empresa="cota", count=1, body={"detail": "sede desconocida"})
    assert backend.post_alert(alarma("funza"), key="f1")[0] == 201
    status, body = backend.post_alert(alarma("cota"), key="c1")
    assert (status, body) == (422, {"detail": "sede desconocida"})
    assert backend.post_alert(alarma("cota"), key="c2")[0] == 201  # count used up
    assert [a["idempotency_key"] for a in backend.alerts()] == ["f1", "c2"]

    backend.fault(status=422, empresa="madrid")  # no count: forever
    for n in range(3):
        assert backend.post_alert(alarma("madrid", n), key=f"m{n}")[0] == 422
    backend.clear_fault()
    assert backend.post_alert(alarma("madrid"), key="m9")[0] == 201
    assert [r["status"] for r in backend.requests()] == [201, 422, 201, 422, 422, 422, 201]


def test_delay_fault(backend: Backend) -> None:
    backend.fault(delay=0.3)
    t0 = time.monotonic()
    assert backend.post_alert(alarma("cota"), key="d1")[0] == 201
    assert time.monotonic() - t0 >= 0.3
    backend.fault(delay=0)  # replaces the delay rule
    t0 = time.monotonic()
    assert backend.post_alert(alarma("cota"), key="d2")[0] == 201
    assert time.monotonic() - t0 < 0.3


def test_token(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend(token=TOKEN)
    assert backend.post_alert(alarma("cota"), key="t1")[0] == 401
    assert backend.post_alert(alarma("cota"), key="t1", token=TOKEN + "x")[0] == 401
    assert backend.post_alert(alarma("cota"), key="t1", token=TOKEN)[0] == 201
    assert backend.call("GET", "/api/mqtt-alerts")[0] == 401
    status, listed, _ = backend.call(
        "GET", "/api/mqtt-alerts", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    assert len(listed) == 1
    reqs = backend.requests()
    assert [r["status"] for r in reqs] == [401, 401, 201]
    assert reqs[2]["authorization"] == f"Bearer {TOKEN}"
    assert len(backend.alerts()) == 1


def test_verify_empresa_sede(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    path = "/api/mqtt-alerts/verify-empresa-sede"
    status, body, _ = backend.call("GET", f"{path}?empresa=cota&sede=principal")
    assert (status, body) == (200, {"empresa": "cota", "sede": "principal", "known": True})
    for empresa in ("tocancipa", "funza", "madrid"):
        assert backend.call("GET", f"{path}?empresa={empresa}")[0] == 200
    assert backend.call("GET", f"{path}?empresa=bogota&sede=x")[0] == 404
    assert backend.call("GET", f"{path}?sede=x")[0] == 400

    backend.fault(status=503, target="verify", count=1)  # the bridge must fail open
    assert backend.call("GET", f"{path}?empresa=cota")[0] == 503
    assert backend.call("GET", f"{path}?empresa=cota")[0] == 200
    assert backend.requests() == []  # only process POSTs are recorded

    other = make_backend(empresas=["chia"])
    assert other.call("GET", f"{path}?empresa=chia")[0] == 200
    assert other.call("GET", f"{path}?empresa=cota")[0] == 404


def test_reset(backend: Backend) -> None:
    backend.fault(status=500)
    assert backend.post_alert(alarma("cota"), key="x")[0] == 500
    backend.reset()
    assert backend.requests() == []
    assert backend.faults() == []
    assert backend.post_alert(alarma("cota"), key="x")[0] == 201
    assert backend.alerts()[0]["id"] == 1


def test_restart_keeps_alerts(backend: Backend) -> None:
    assert backend.post_alert(alarma("cota"), key="p1")[0] == 201
    backend.kill()
    assert not backend.running()
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        backend.call("GET", "/_test/alerts")
    backend.start()
    assert [a["idempotency_key"] for a in backend.alerts()] == ["p1"]
    assert backend.post_alert(alarma("cota"), key="p1")[0] == 200  # still a duplicate


async def test_burst_with_httpx(make_backend: Callable[..., Backend]) -> None:
    """A couple of thousand keep-alive POSTs from the bridge's HTTP client, 10 at a time.

    (httpx's pool costs client CPU per connection: at 50 connections the client, not this
    server, is the bottleneck, ~250 req/s vs ~850 at 5-20 on this 2-core box.)"""
    backend = make_backend()
    total, concurrency = 2000, 10
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=backend.url, limits=limits, timeout=10) as client:

        async def worker(start: int) -> None:
            for n in range(start, total, concurrency):
                r = await client.post(
                    "/api/mqtt-alerts/process",
                    json=alarma(("cota", "funza", "madrid")[n % 3], n),
                    headers={"Idempotency-Key": f"burst-{n}"},
                )
                statuses.append(r.status_code)

        t0 = time.monotonic()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for w in range(concurrency):
                    nursery.start_soon(worker, w)
        elapsed = time.monotonic() - t0

    assert statuses.count(201) == total
    assert len(backend.alerts()) == total
    assert len(backend.requests()) == total
    assert backend.log_text().count("POST /api/mqtt-alerts/process 201") == total
    print(f"\nburst: {total / elapsed:.0f} req/s")

    with trio.fail_after(5):
        assert await backend.wait_for_async(lambda: len(backend.alerts()) == total) is True


# --- process fixtures ----------------------------------------------------------------------


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


class _Mqtt:
    """A paho client driven synchronously by loop() calls (no background thread)."""

    def __init__(self, port: int, client_id: str, *, clean_session: bool = True) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.acked: set[int] = set()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
        )
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, rc, p: self.acked.add(mid)
        self.client.on_publish = lambda c, u, mid, rc, p: self.acked.add(mid)
        self.client.connect("127.0.0.1", port, keepalive=10)

    def loop_until(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "MQTT condition not met in time"
            self.client.loop(0.05)

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        self.loop_until(lambda: mid in self.acked)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        self.loop_until(lambda: info.mid in self.acked)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop(0.05)


def test_mosquitto_kill_and_restart_keeps_sessions(mosquitto: Mosquitto) -> None:
    sub = _Mqtt(mosquitto.port, "test-sub", clean_session=False)
    sub.subscribe("empresas/#")
    sub.close()

    pub = _Mqtt(mosquitto.port, "test-pub")
    pub.publish("empresas/cota", b'{"tipo_mensaje": "heartbeat"}')
    pub.close()

    pid = mosquitto.pid
    mosquitto.restart()  # SIGTERM saves the persistent session and its queued message
    assert not pid_alive(pid)
    assert mosquitto.pid != pid
    sub = _Mqtt(mosquitto.port, "test-sub", clean_session=False)
    sub.loop_until(lambda: len(sub.messages) == 1)
    assert sub.messages == [("empresas/cota", b'{"tipo_mensaje": "heartbeat"}')]
    sub.close()

    mosquitto.kill()
    assert not mosquitto.running()
    assert _refused(mosquitto.port)
    mosquitto.start()  # same port
    assert mosquitto.running()
    assert mosquitto.url == f"127.0.0.1:{mosquitto.port}"
    c = _Mqtt(mosquitto.port, "test-after-kill")
    c.subscribe("x")
    c.close()


def _redis(port: int, *args: str) -> Any:
    """One RESP command over a fresh socket (no redis client library needed)."""
    cmd = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(cmd.encode())
        line = f.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:].decode()
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest)
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else f.read(n + 2)[:-2].decode()
        raise AssertionError(f"unexpected reply {line!r}")


def test_redis_kill9_keeps_data_and_wipe_empties(redis_server: Redis) -> None:
    port = redis_server.port
    assert redis_server.url == f"redis://127.0.0.1:{port}/0"
    assert _redis(port, "PING") == "PONG"
    assert _redis(port, "XADD", "botonera:outbox", "*", "e", "1").endswith("-0")
    assert _redis(port, "SET", "k", "v") == "OK"

    redis_server.kill()  # -9: only the appendonly file saves us
    assert _refused(port)
    redis_server.start()
    assert redis_server.port == port
    assert _redis(port, "GET", "k") == "v"
    assert _redis(port, "XLEN", "botonera:outbox") == 1

    redis_server.stop()
    redis_server.wipe()
    redis_server.start()
    assert _redis(port, "GET", "k") is None
    assert _redis(port, "DBSIZE") == 0


def test_redis_without_appendonly_forgets_on_kill(make_redis: Callable[..., Redis]) -> None:
    server = make_redis(appendonly=False)
    assert _redis(server.port, "SET", "k", "v") == "OK"
    server.kill()
    server.start()
    assert _redis(server.port, "GET", "k") is None
