"""Must-show 2: SIGHUP reloads empresas and contactos without a restart; an invalid
file is refused with the key named, and the running configuration stays."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from tests.support.backend import Backend
from tests.support.bridge import BridgeProc, Publisher, merge, wait_until, write_toml

A, B, C = "+573001110001", "+573002220002", "+573003330003"
MASKED = {A: "+57******0001", B: "+57******0002", C: "+57******0003"}


def _alarm(empresa: str, descripcion: str) -> dict[str, Any]:
    return {
        "tipo_mensaje": "alarmas",
        "tipo_alarma": "CRITICA",
        "descripcion": descripcion,
        "empresa": empresa,
    }


def _reached(bridge: BridgeProc, descripcion: str) -> set[str]:
    """Numbers whose WhatsApp (log provider) line carries this alarm."""
    lines = [ln for ln in bridge.log_text().splitlines() if "WhatsApp → " in ln]
    return {n for n, m in MASKED.items() for ln in lines if m in ln and descripcion in ln}


def _hup(bridge: BridgeProc, marker: str, before: int) -> None:
    os.kill(bridge.pid, signal.SIGHUP)
    wait_until(lambda: bridge.log_text().count(marker) > before, 10, marker)


def test_sighup_reload_contacts_empresas_and_refuse_invalid(
    bridge_factory: Callable[..., BridgeProc], backend: Backend, publisher: Publisher
) -> None:
    conf: dict[str, Any] = {
        "whatsapp": {"min_interval": 0.2},  # 6 s per number in production; short here
        "heartbeat": {"timeout": 2.0},  # a listed panel is "nunca visto" after one timeout
        "empresas": [{"id": "cota", "contactos": [A]}],
    }
    bridge = bridge_factory(conf=conf).start()
    pid = bridge.pid

    publisher.publish(_alarm("cota", "antes de recargar"))
    wait_until(lambda: _reached(bridge, "antes de recargar") == {A}, 15, "first alarm to A")

    # the file gains contacto B, a new empresa zipaquira (contacto C) and a broker change
    new = merge(bridge.conf, {"mqtt": {**bridge.conf["mqtt"], "keepalive": 45}})
    new["empresas"] = [
        {"id": "cota", "contactos": [A, B]},
        {"id": "zipaquira", "nombre": "Zipaquirá", "contactos": [C], "paneles": ["norte/p1"]},
    ]
    write_toml(bridge.config, new)
    _hup(bridge, "config reloaded", 0)
    assert bridge.pid == pid
    assert bridge.running()
    log = bridge.log_text()
    assert "need a restart" in log
    assert "mqtt.keepalive" in log

    publisher.publish(_alarm("cota", "cota tras recargar"))
    publisher.publish(_alarm("zipaquira", "zipaquira nueva"))
    wait_until(lambda: _reached(bridge, "cota tras recargar") == {A, B}, 15, "cota to A and B")
    wait_until(lambda: _reached(bridge, "zipaquira nueva") == {C}, 15, "zipaquira to C")

    def listed_panel() -> list[tuple[str, str]]:
        zipa = [e for e in bridge.status()["empresas"] if e["id"] == "zipaquira"]
        return [(d["key"], d["state"]) for e in zipa for d in e["devices"]]

    # the inventory applies too: the newly listed panel is expected from the reload on
    wait_until(
        lambda: listed_panel() == [("zipaquira/norte/p1", "nunca visto")],
        10,
        "listed panel nunca visto",
    )

    # an unknown key: refused, named, and the running config (A and B) stays
    bad = dict(new)
    bad["contactoz"] = [C]
    write_toml(bridge.config, bad)
    _hup(bridge, "config reload refused", 0)
    assert bridge.pid == pid
    assert bridge.running()
    refused = [ln for ln in bridge.log_text().splitlines() if "config reload refused" in ln]
    assert "contactoz" in refused[0]

    publisher.publish(_alarm("cota", "tras archivo malo"))
    wait_until(lambda: _reached(bridge, "tras archivo malo") == {A, B}, 15, "still A and B")

    descripciones = {"antes de recargar", "cota tras recargar", "zipaquira nueva"}
    descripciones.add("tras archivo malo")
    wait_until(
        lambda: {a["payload"].get("descripcion") for a in backend.alerts()} >= descripciones,
        15,
        "all four alarms at the backend",
    )
    code, body = bridge.http("/metrics")
    assert code == 200
    text = body.decode()
    assert 'botonera_config_reloads_total{result="applied"} 1.0' in text
    assert 'botonera_config_reloads_total{result="refused"} 1.0' in text
    assert bridge.terminate() == 0
