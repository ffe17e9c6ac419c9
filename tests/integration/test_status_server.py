"""The status server over real loopback HTTP (hypercorn's trio worker), and its page in
headless Chromium. Real sockets: no autojump_clock here."""

from __future__ import annotations

import html
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from botonera_bridge.health import Health
from botonera_bridge.messages import now_rfc3339
from botonera_bridge.metrics import Metrics
from botonera_bridge.status.server import serve_status

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TOKEN = "s3cr3t-token"  # noqa: S105 - a test token
T0 = time.time()


def ago(seconds: float) -> str:
    return now_rfc3339(int((T0 - seconds) * 1e9))


XSS = "<img src=x onerror=\"document.title='pwned'\">"


def sample_snapshot() -> dict[str, Any]:
    return {
        "components": {
            "mqtt": {"up": True, "detail": "127.0.0.1:1883"},
            "redis": {"up": False, "detail": "connection refused"},
            "backend": {"up": True, "detail": ""},
            "websocket": {"up": True, "detail": ""},
        },
        "empresas": [
            {
                "id": "cota",
                "name": "Cota",
                "semaforo": {"color": "ROJO", "since": ago(200)},
                "devices": [
                    {
                        "key": "cota/principal/p1",
                        "sede": "principal",
                        "dispositivo": "p1",
                        "state": "online",
                        "last_seen": ago(200),
                    },
                    {
                        "key": "cota/norte/p2",
                        "sede": "norte",
                        "dispositivo": "p2",
                        "state": "offline",
                        "last_seen": ago(4000),
                    },
                ],
                "alarms": [
                    {
                        "id": "a1",
                        "tipo_alarma": "CRITICA",
                        "descripcion": "Fallo en sistema " + XSS,
                        "since": ago(200),
                        "ack": None,
                    },
                    {
                        "id": "a2",
                        "tipo_alarma": "MEDIA",
                        "descripcion": "Puerta abierta",
                        "since": ago(900),
                        "ack": {"by": "+57******2233", "at": ago(600)},
                    },
                ],
            },
            {
                "id": "tocancipa",
                "name": "Tocancipá",
                "semaforo": {"color": "AZUL", "since": ago(7300)},
                "devices": [],
                "alarms": [],
            },
            {
                "id": "funza",
                "name": "Funza",
                "semaforo": {"color": "morado", "since": ago(7300)},
                "devices": [],
                "alarms": [],
            },
            {"id": "madrid", "name": "Madrid", "semaforo": None, "devices": [], "alarms": []},
        ],
        "queues": {"outbox_backend": 3, "outbox_whatsapp": 0, "inbox": 0, "dead": 1},
        "memory_fallback": True,
        "counters": {"recibidos": 42},
    }


@asynccontextmanager
async def serving(
    *,
    token: str = "",
    health: Health | None = None,
    metrics: Metrics | None = None,
    snapshot: Callable[[], dict[str, Any]] = sample_snapshot,
) -> AsyncIterator[str]:
    health = health or Health(stall_timeout=60)
    metrics = metrics or Metrics()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: serve_status(
                "127.0.0.1:0",
                metrics=metrics,
                health=health,
                snapshot=snapshot,
                token=token,
                task_status=task_status,
            )
        )
        assert urls[0].startswith("http://127.0.0.1:")
        yield urls[0]
        nursery.cancel_scope.cancel()


async def test_healthz_and_readyz(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    health = Health(stall_timeout=60)
    health.require("mqtt")
    with trio.fail_after(20):
        async with serving(health=health) as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/healthz")
            assert (r.status_code, r.text) == (200, "ok\n")

            r = await client.get("/readyz")
            assert r.status_code == 503
            assert r.json() == {"ready": False, "reasons": ["mqtt: not connected yet"]}

            health.set("mqtt", True)
            health.task_died("router", "boom")
            assert (await client.get("/readyz")).json()["reasons"] == ["task router died: boom"]

    ready = Health(stall_timeout=60)
    ready.require("mqtt")
    ready.set("mqtt", True)
    with trio.fail_after(20):
        async with serving(health=ready) as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/readyz")
            assert (r.status_code, r.json()) == (200, {"ready": True})
            assert r.headers["content-type"] == "application/json"
    # no log line per request, nothing from hypercorn at INFO or above
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.INFO and r.name.startswith(("hypercorn", "botonera_bridge"))
    ]
    assert [r.name for r in loud] == ["botonera_bridge.status.server"] * 2
    assert all("listening on http://127.0.0.1:" in r.getMessage() for r in loud)


async def test_metrics_parse_and_counter_matches() -> None:
    metrics = Metrics()
    metrics.received.labels(tipo="alarmas").inc(3)
    metrics.delivered.labels(sink="backend").inc()
    metrics.devices.labels(state="online").set(7)
    with trio.fail_after(20):
        async with serving(metrics=metrics) as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }
    assert samples[("botonera_messages_received_total", (("tipo", "alarmas"),))] == 3
    assert samples[("botonera_delivered_total", (("sink", "backend"),))] == 1
    assert samples[("botonera_devices", (("state", "online"),))] == 7


async def test_api_status_json() -> None:
    health = Health(stall_timeout=60)
    health.require("redis")
    with trio.fail_after(20):
        async with serving(health=health) as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/api/status")
    assert r.status_code == 200
    data = r.json()
    expected = sample_snapshot()
    for key, value in expected.items():
        assert data[key] == value
    assert data["ready"] is False
    assert data["reasons"] == ["redis: not connected yet"]
    assert data["generated_at"].endswith("Z")
    assert r.headers["cache-control"] == "no-store"


async def test_token_required_everywhere_but_healthz() -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with trio.fail_after(20):
        async with serving(token=TOKEN) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/healthz")).status_code == 200
            for path in ("/readyz", "/metrics", "/api/status", "/"):
                r = await client.get(path)
                assert r.status_code == 401, path
                assert r.headers["www-authenticate"].startswith("Bearer")
                wrong = {"Authorization": "Bearer nope"}
                assert (await client.get(path, headers=wrong)).status_code == 401, path
                r = await client.get(path, headers=auth)
                assert r.status_code in (200, 503), path
            # a phone browser: the page and its own fetches may carry ?token=
            assert (await client.get("/", params={"token": TOKEN})).status_code == 200
            assert (await client.get("/api/status", params={"token": TOKEN})).status_code == 200
            assert (await client.get("/metrics", params={"token": TOKEN})).status_code == 401
            assert (await client.get("/", params={"token": "nope"})).status_code == 401
            assert (await client.get("/", params={"token": "ñandú"})).status_code == 401
            accented = {"Authorization": "Bearer ñandú".encode()}
            assert (await client.get("/readyz", headers=accented)).status_code == 401


async def test_webhook_and_alarm_routes() -> None:
    """/webhooks/whatsapp needs no status token (its signature authenticates it);
    /api/alarms/<id> does; bodies are bounded."""
    import hashlib
    import hmac

    from botonera_bridge.inbound.webhook import MAX_BODY, Webhook

    hook = Webhook(app_secret="s3", verify_token="vt")  # noqa: S106 - test values
    timelines = {"ev1": {"id": "ev1", "reached": 1}}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = b'{"object":"whatsapp_business_account","entry":[]}'
    good = "sha256=" + hmac.new(b"s3", body, hashlib.sha256).hexdigest()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(
                partial(
                    serve_status, "127.0.0.1:0", metrics=Metrics(), health=Health(60),
                    snapshot=sample_snapshot, token=TOKEN, alarm=timelines.get, webhook=hook,
                )
            )  # fmt: skip
            async with httpx.AsyncClient(base_url=url) as client:
                q = {"hub.mode": "subscribe", "hub.verify_token": "vt", "hub.challenge": "99"}
                r = await client.get("/webhooks/whatsapp", params=q)
                assert (r.status_code, r.text) == (200, "99")
                bad = dict(q, **{"hub.verify_token": "no"})
                assert (await client.get("/webhooks/whatsapp", params=bad)).status_code == 403
                headers = {"X-Hub-Signature-256": good}
                r = await client.post("/webhooks/whatsapp", content=body, headers=headers)
                assert r.status_code == 200
                r = await client.post("/webhooks/whatsapp", content=body + b" ", headers=headers)
                assert r.status_code == 403
                big = b"x" * (MAX_BODY + 1)
                assert (await client.post("/webhooks/whatsapp", content=big)).status_code == 413
                assert (await client.put("/webhooks/whatsapp", content=body)).status_code == 405
                assert (await client.get("/api/alarms/ev1")).status_code == 401
                r = await client.get("/api/alarms/ev1", headers=auth)
                assert r.json() == {"id": "ev1", "reached": 1}
                assert (await client.get("/api/alarms/nope", headers=auth)).status_code == 404
                assert (await client.post("/api/alarms/ev1", headers=auth)).status_code == 404
            nursery.cancel_scope.cancel()
    # without a webhook configured the routes do not exist
    async with serving() as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/webhooks/whatsapp")).status_code == 404


async def test_page_404_405_head_and_errors() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("snapshot failed")

    with trio.fail_after(20):
        async with serving() as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/")
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/html; charset=utf-8"
            assert "<title>botonera-bridge — estado</title>" in r.text
            assert "default-src 'none'" in r.headers["content-security-policy"]
            assert (await client.get("/nope")).status_code == 404
            assert (await client.get("/api/status/")).status_code == 404
            r = await client.post("/api/status")
            assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD")
            r = await client.head("/healthz")
            assert (r.status_code, r.content) == (200, b"")
        async with serving(snapshot=broken) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/api/status")).status_code == 500
            assert (await client.get("/healthz")).status_code == 200


async def test_started_once_listening_and_returns_on_cancel() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                lambda task_status: serve_status(
                    "127.0.0.1:0",
                    metrics=Metrics(),
                    health=Health(60),
                    snapshot=sample_snapshot,
                    task_status=task_status,
                )
            )
            # a keep-alive connection stays open across the cancellation
            async with httpx.AsyncClient(base_url=urls[0]) as client:
                assert (await client.get("/healthz")).status_code == 200
                nursery.cancel_scope.cancel()
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(base_url=urls[0]) as client:
                await client.get("/healthz")


# -- the page in a real browser -------------------------------------------------------


NEEDS_CHROMIUM = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} not installed; CI installs it with: apt-get install -y chromium",
)


def chromium_cmd(profile: Path, *extra: str) -> list[str]:
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *extra,
    ]


async def run_chromium(cmd: list[str], home: Path) -> str:
    env = dict(os.environ, HOME=str(home))
    with trio.fail_after(90):
        proc = await trio.run_process(
            cmd, capture_stdout=True, capture_stderr=True, env=env, check=False
        )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc.stdout.decode()


@NEEDS_CHROMIUM
async def test_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    async with serving(token=TOKEN) as url:
        page = f"{url}/?token={TOKEN}"
        dom = await run_chromium(chromium_cmd(tmp_path / "p1", "--dump-dom", page), tmp_path)

        ARTIFACTS.mkdir(exist_ok=True)
        for name, size in (("status-page.png", "1000,1400"), ("status-page-phone.png", "390,1600")):
            shot = ARTIFACTS / name
            shot.unlink(missing_ok=True)
            await run_chromium(
                chromium_cmd(
                    tmp_path / name, f"--screenshot={shot}", f"--window-size={size}", page
                ),
                tmp_path,
            )
            assert shot.stat().st_size > 10_000

    assert "<title>botonera-bridge — estado</title>" in dom
    for nombre in ("Cota", "Tocancipá", "Funza", "Madrid"):
        assert f'data-testid="empresa-nombre">{nombre}</h2>' in dom
    assert 'data-state="online"' in dom
    assert "en línea" in dom
    assert "fuera de línea" in dom
    assert 'data-color="ROJO"' in dom
    assert 'class="semaforo sem-ROJO"' in dom
    assert "AZUL · código azul" in dom
    assert (
        'data-color="MORADO" title="Semáforo">morado</span>' in dom
    )  # unknown colour: shown neutral
    assert "sin semáforo" in dom
    assert "sin atender" in dom
    assert "atendida por +57******2233" in dom
    assert "Modo memoria" in dom
    assert 'id="memory-warning" data-testid="memory-warning" class="banner warn">' in dom
    assert "Redis: caído" in dom
    assert 'data-testid="queue-outbox_backend"' in dom
    # data is text, never markup
    assert html.escape(XSS, quote=False) in dom
    assert "<img" not in dom
    assert "<title>botonera-bridge — estado</title>" in dom  # onerror never ran
    # the page had the token: no access error shown
    assert 'id="error" data-testid="error" class="banner bad" role="alert" hidden=""' in dom


@NEEDS_CHROMIUM
async def test_page_shows_bridge_errors(tmp_path: Path) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("snapshot failed")

    async with serving(snapshot=broken) as url:
        dom = await run_chromium(chromium_cmd(tmp_path / "p", "--dump-dom", f"{url}/"), tmp_path)
    assert "El puente respondió 500" in dom
    assert 'class="stale"' in dom


def reach_snapshot() -> dict[str, Any]:
    snap = sample_snapshot()
    cota = snap["empresas"][0]
    cota["alarms"][0] |= {"reached": 2, "read_by": 1}
    cota["alarms"][1] |= {"reached": 3, "read_by": 2}
    snap["empresas"].append(
        {
            "id": "sin_configurar",
            "name": "Empresas sin configurar",
            "semaforo": None,
            "devices": [],
            "alarms": [
                {
                    "id": "u1",
                    "empresa": "bogota",
                    "tipo_alarma": "CRITICA",
                    "descripcion": "Sin configurar",
                    "since": ago(30),
                    "ack": None,
                    "reached": 1,
                    "read_by": 0,
                }
            ],
            "alarms_total": 180,
        }
    )
    return snap


@NEEDS_CHROMIUM
async def test_page_shows_reached_read_taken_per_alarm(tmp_path: Path) -> None:
    """Issue 10, must-show 10: per open alarm 'avisados N · leído por M · atendida por X'."""
    async with serving(snapshot=reach_snapshot) as url:
        dom = await run_chromium(chromium_cmd(tmp_path / "p", "--dump-dom", f"{url}/"), tmp_path)
    reach = 'data-testid="alarm-reach">'
    assert f"{reach}avisados 2 · leído por 1 · sin atender</div>" in dom
    assert f"{reach}avisados 3 · leído por 2 · atendida por +57******2233</div>" in dom
    assert f"{reach}avisados 1 · leído por 0 · sin atender</div>" in dom
    assert "ALARMA CRITICA — bogota" in dom
    assert "Alarmas abiertas (180)" in dom
    # an alarm without a timeline shows no reach line (older bridge, nothing tracked)
    assert dom.count(reach) == 3
