"""The /api/status model from explicit inputs: English keys, the counter invariant, gauges."""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from botonera_bridge.config import from_mapping
from botonera_bridge.health import Health
from botonera_bridge.intake.topics import decode_mqtt
from botonera_bridge.metrics import Metrics
from botonera_bridge.queues.link import RedisLink
from botonera_bridge.queues.outbox import DeadLetters, Outbox
from botonera_bridge.queues.state import HashStore
from botonera_bridge.queues.streams import DurableStream
from botonera_bridge.status.model import StatusModel
from botonera_bridge.watch.alarms import AlarmBook
from botonera_bridge.watch.receipts import Timelines
from botonera_bridge.watch.watchdog import Watchdog

SETTINGS = from_mapping({"empresas": [{"id": "cota", "nombre": "Cota"}]})
# values may be Spanish (vocabulary), keys may not
SPANISH_KEYS = {
    "detalle", "nombre", "alarmas", "alarmas_total", "desde", "avisos", "acuse", "por", "en",
    "avisados", "leidos", "invariante", "recibidos", "pendientes_al_iniciar", "entregados",
    "en_cola_o_en_vuelo", "cumple", "generado_en",
}  # fmt: skip


def keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        out = set(value)
        for k, v in value.items():
            if k != "counters":  # metric names, not keys of the model
                out |= keys(v)
        return out
    if isinstance(value, list):
        return set().union(*(keys(v) for v in value)) if value else set()
    return set()


async def test_snapshot_keys_invariant_and_gauges(autojump_clock: trio.abc.Clock) -> None:
    metrics, health = Metrics(), Health(60.0)
    link = RedisLink(None, metrics=metrics)
    dead = DeadLetters(link, "t:dead", metrics, max_payload=65536, dead_max=100)
    outbox = Outbox(link, "t", consumer="c", memory_limit=1000, dead=dead)
    inbox = DurableStream(link, "t:inbox", ("workers",), consumer="c", memory_limit=1000)
    alarms = HashStore("t:alarms", None)
    book = AlarmBook(
        alarms,
        escalation_after=300.0,
        escalation_max=3,
        configured=lambda e: SETTINGS.empresa(e) is not None,
    )
    timelines = Timelines(alarms, clock=book.clock)
    watchdog = Watchdog(
        timeout=60.0, store=HashStore("t:devices", None), emit=outbox.emit, metrics=metrics
    )
    status = StatusModel(
        settings=lambda: SETTINGS, health=health, metrics=metrics, link=link, outbox=outbox,
        inbox=inbox, inbox_group="workers", dead=dead, devices=watchdog.devices_of, book=book,
        timelines=timelines, backend_error=lambda: "HTTP 503", websocket_enabled=False,
    )  # fmt: skip
    body = {"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "dispositivo": "p1", "id": 1}
    _, event = decode_mqtt(json.dumps(body).encode(), "empresas/cota/norte", time.time_ns(), 65536)
    beat = json.dumps({"tipo_mensaje": "heartbeat", "dispositivo": "p1"}).encode()
    watchdog.seen(decode_mqtt(beat, "empresas/cota/norte", time.time_ns(), 65536)[1])
    timelines.track(book.observe(event))
    await outbox.append([(event, event.id)])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(status.run)
        await trio.sleep(1.5)  # two refreshes
        nursery.cancel_scope.cancel()

    snap = status.snapshot()
    assert not keys(snap) & SPANISH_KEYS, keys(snap) & SPANISH_KEYS
    assert snap["components"]["backend"] == {"up": False, "detail": "HTTP 503"}
    assert snap["components"]["websocket"] == {"up": False, "detail": "desactivado"}
    assert snap["queues"] == {"outbox_backend": 1, "outbox_whatsapp": 1, "inbox": 0, "dead": 0}
    assert snap["memory_fallback"] is True
    assert snap["ha"] == {"enabled": False}
    cota = next(e for e in snap["empresas"] if e["id"] == "cota")
    assert (cota["name"], len(cota["devices"])) == ("Cota", 1)
    (alarm,) = cota["alarms"]
    assert (alarm["id"], alarm["tipo_alarma"], alarm["ack"]) == (event.id, "CRITICA", None)
    assert alarm["since"].endswith("Z")
    for sink in ("backend", "whatsapp"):
        assert snap["invariant"][sink] == {
            "received": 1,
            "backlog_at_start": 0,
            "delivered": 0,
            "dead_letters": 0,
            "queued_or_in_flight": 1,
            "holds": True,
        }
    sample = metrics.registry.get_sample_value
    assert sample("botonera_open_alarms", {"empresa_bucket": "cota"}) == 1
    assert sample("botonera_queue_depth", {"queue": "outbox_backend"}) == 1
