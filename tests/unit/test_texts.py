"""WhatsApp texts: every kind, Bogota time, unknown empresas, counts, masking."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from botonera_bridge.config import Empresa
from botonera_bridge.ids import mask_phone
from botonera_bridge.messages import Event
from botonera_bridge.sinks import texts
from botonera_bridge.sinks.whatsapp_api import LogSender
from botonera_bridge.watch.alarms import OpenAlarm

# 2024-05-02 19:32:10 UTC == 14:32 in Bogota (UTC-5, no DST)
T_NS = int(dt.datetime(2024, 5, 2, 19, 32, 10, tzinfo=dt.UTC).timestamp() * 1e9)
COTA = Empresa(id="cota", nombre="Cota", contactos=("+573001112233",))
TOCANCIPA = Empresa(id="tocancipa", nombre="Tocancipá")


def ev(tipo: str, **kw: object) -> Event:
    base: dict[str, object] = {
        "id": "e1",
        "tipo": tipo,
        "empresa": "cota",
        "sede": "principal",
        "dispositivo": "",
        "topic": "empresas/cota",
        "recibido_en": "",
        "origen": "mqtt",
        "payload": b"{}",
        "received_ns": T_NS,
    }
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


def test_alarm_text_matches_design_example():
    e = ev("alarmas", detail={"tipo_alarma": "CRITICA", "descripcion": "Fallo en sistema"})
    assert texts.event_text(e, COTA) == (
        "🚨 ALARMA CRITICA — Cota (sede principal): Fallo en sistema · 14:32"
    )


def test_alarm_without_description_or_sede():
    e = ev("alarmas", sede="", detail={"tipo_alarma": "CRITICA", "descripcion": ""})
    assert texts.event_text(e, COTA) == "🚨 ALARMA CRITICA — Cota: sin descripción · 14:32"


def test_display_name_with_accent():
    e = ev("alarmas", empresa="tocancipa", sede="", detail={"tipo_alarma": "", "descripcion": "x"})
    assert texts.event_text(e, TOCANCIPA) == "🚨 ALARMA — Tocancipá: x · 14:32"


@pytest.mark.parametrize(
    ("colour", "expected"),
    [
        ("VERDE", "🟢 SEMÁFORO VERDE — Cota (sede principal): normal · 14:32"),
        ("amarillo", "🟡 SEMÁFORO AMARILLO — Cota (sede principal): precaución · 14:32"),
        ("NARANJA", "🟠 SEMÁFORO NARANJA — Cota (sede principal): alerta · 14:32"),
        ("Rojo", "🔴 SEMÁFORO ROJO — Cota (sede principal): emergencia · 14:32"),
        (
            "AZUL",
            "🔵 SEMÁFORO AZUL — Cota (sede principal): código azul — emergencia médica · 14:32",
        ),
        ("MORADO", "🚦 SEMÁFORO MORADO — Cota (sede principal) · 14:32"),
    ],
)
def test_semaforo_colours(colour, expected):
    assert texts.event_text(ev("semaforos", detail={"tipo_alarma": colour}), COTA) == expected


def test_watchdog_offline_and_online():
    off = ev("estado", origen="watchdog", dispositivo="btn_1", detail={"status": "offline"})
    on = ev("estado", origen="watchdog", dispositivo="btn_1", detail={"status": "online"})
    assert texts.event_text(off, COTA) == (
        "📴 PANEL SIN CONEXIÓN — Cota (sede principal, panel btn 1): sin señal del panel · 14:32"
    )
    assert texts.event_text(on, COTA).startswith("✅ PANEL EN LÍNEA — Cota (sede principal")


def test_prueba_is_marked():
    e = ev("alarmas", prueba=True, detail={"tipo_alarma": "CRITICA", "descripcion": "x"})
    assert texts.event_text(e, COTA).startswith("[PRUEBA] 🚨 ALARMA CRITICA — Cota")
    assert texts.template_params(e, COTA)[1] == "[PRUEBA] ALARMA CRITICA"


def test_unknown_and_missing_empresa():
    e = ev("alarmas", empresa="chia", detail={"tipo_alarma": "CRITICA", "descripcion": "x"})
    assert "empresa «chia» (no configurada)" in texts.event_text(e, None)
    e2 = ev("alarmas", empresa="", sede="", detail={"tipo_alarma": "CRITICA", "descripcion": "x"})
    assert "empresa sin identificar" in texts.event_text(e2, None)


def test_count_suffix_and_escalation_prefix():
    e = ev("alarmas", detail={"tipo_alarma": "CRITICA", "descripcion": "Fallo"})
    assert texts.event_text(e, COTA, count=10, span_seconds=0.4) == (
        "🚨 ALARMA CRITICA — Cota (sede principal): Fallo (×10 en 1 min) · 14:32"
    )
    assert texts.count_suffix(1, 0) == ""
    assert texts.count_suffix(3, 61) == "(×3 en 2 min)"
    assert texts.event_text(e, COTA, escalation=(2, 3)).startswith(
        "⚠️ SIN ATENDER (aviso 2/3) 🚨 ALARMA CRITICA"
    )


def test_summary_text():
    e = ev("alarmas", detail={"tipo_alarma": "CRITICA", "descripcion": "Fallo"})
    later = T_NS + 60 * 10**9
    assert texts.summary_text(e, COTA, 4, last_ns=later) == (
        "🔁 ALARMA CRITICA — Cota (sede principal): Fallo · se repitió 4 veces más (hasta 14:33)"
    )
    assert "se repitió 1 vez más" in texts.summary_text(e, COTA, 1, last_ns=later)


def test_template_params():
    e = ev("alarmas", detail={"tipo_alarma": "CRITICA", "descripcion": "Fallo"})
    assert texts.template_params(e, COTA) == (
        "Cota (sede principal)",
        "ALARMA CRITICA",
        "Fallo · 14:32",
    )
    assert texts.template_params(e, COTA, count=3)[2] == "Fallo (×3 en 1 min) · 14:32"


def test_bogota_time_across_midnight_utc():
    # 03:05 UTC is 22:05 the previous day in Bogota
    ns = int(dt.datetime(2024, 1, 1, 3, 5, tzinfo=dt.UTC).timestamp() * 1e9)
    assert texts.clock_time(ns) == "22:05"
    assert texts.TZ.utcoffset(dt.datetime(2024, 7, 1)) == dt.timedelta(hours=-5)


@pytest.mark.parametrize(
    ("tipo", "origen", "status", "prueba", "expected"),
    [
        ("alarmas", "mqtt", "", False, True),
        ("semaforos", "mqtt", "", False, True),
        ("estado", "watchdog", "offline", False, True),
        ("estado", "watchdog", "online", False, True),
        ("estado", "mqtt", "offline", False, True),
        ("estado", "mqtt", "online", False, False),
        ("configuracion", "mqtt", "", False, False),
        ("heartbeat", "mqtt", "", False, False),
        ("heartbeat", "mqtt", "", True, True),
    ],
)
def test_which_events_notify(tipo, origen, status, prueba, expected):
    e = ev(tipo, origen=origen, prueba=prueba, detail={"status": status} if status else {})
    assert texts.notifies(e) is expected


async def test_log_sender_masks_number(caplog):
    caplog.set_level(logging.INFO, logger="botonera_bridge.whatsapp")
    await LogSender().send_text("+573001112233", "hola")
    assert "573001112233" not in caplog.text
    assert f"WhatsApp → {mask_phone('+573001112233')}: hola" in caplog.text
    assert mask_phone("+573001112233") == "+57******2233"


def test_unknown_to_backend_names_the_alarm_type_not_its_emoji():
    """Issue 12's bug: central read '…: 🚨 quedó en dead letters'."""
    e = ev("alarmas", empresa="chia", detail={"tipo_alarma": "CRITICA", "descripcion": "x"})
    text = texts.unknown_to_backend_text(e)
    assert text == (
        "⚠️ El backend no reconoce la empresa «chia», sede «principal»: ALARMA CRITICA quedó en "
        "dead letters (botonera-bridge dead-letters list) · 14:32"
    )
    assert ": 🚨" not in text


def test_clip_counts_like_whatsapp_and_marks_the_cut():
    assert texts.clip("corto") == "corto"
    assert texts.clip("x" * 4096) == "x" * 4096
    cut = texts.clip("x" * 5000)
    assert len(cut) == 4096
    assert cut.endswith("x…")
    emoji = texts.clip("🚨" * 3000)  # two UTF-16 units each
    assert len(emoji.encode("utf-16-le")) // 2 <= 4096
    assert emoji.endswith("…")
    assert texts.clip("palabra " * 2, 10) == "palabra p…"
    assert texts.clip("palabra  " * 2, 10) == "palabra…"


def test_one_line_template_parameter():
    p = texts.one_line("Incendio\nen\tla    bodega " * 200)
    assert "\n" not in p
    assert "\t" not in p
    assert "  " not in p
    assert len(p) <= 1024
    assert p.endswith("…")
    assert texts.one_line(" a \n b ") == "a b"


def test_digest_line_and_panels_summary():
    e = ev("alarmas", detail={"tipo_alarma": "CRITICA", "descripcion": "Incendio\nnorte"})
    assert texts.line_text(e, COTA, count=3, with_empresa=False) == (
        "🚨 ALARMA CRITICA — sede principal: Incendio norte ×3 · 14:32"
    )
    assert texts.line_text(e, COTA).startswith("🚨 ALARMA CRITICA — Cota (sede principal): ")
    panels = [
        ev("estado", origen="watchdog", dispositivo=f"p{i}", detail={"status": "offline"})
        for i in range(12)
    ]
    assert texts.panels_text(panels, COTA) == (
        "📴 12 paneles sin conexión — Cota: principal/p0, principal/p1, principal/p2, "
        "principal/p3, principal/p4, principal/p5, principal/p6, principal/p7, principal/p8, "
        "principal/p9 y 2 más · 14:32"
    )


async def test_log_sender_keeps_a_digest_on_one_log_line(caplog):
    caplog.set_level(logging.INFO)
    await LogSender().send_text("+573001112233", "🚨 2 alertas — Cota\n🚨 uno\n🚨 dos")
    (record,) = caplog.records
    assert record.getMessage() == "WhatsApp → +57******2233: 🚨 2 alertas — Cota ⏎ 🚨 uno ⏎ 🚨 dos"


def test_board_alarms_read_like_their_first_notice():
    """commands.py's replies and reminders take these from texts.py (issue 12)."""
    alarm = OpenAlarm(
        id="e1", empresa="cota", sede="sede_norte", tipo="alarmas", tipo_alarma="CRITICA",
        descripcion="Fallo en sistema", opened_at=0.0, received_ns=T_NS,
    )  # fmt: skip
    event = ev("alarmas", sede="sede_norte",
               detail={"tipo_alarma": "CRITICA", "descripcion": "Fallo en sistema"})  # fmt: skip
    assert texts.alarm_label(alarm, COTA) == (
        "CRITICA — Cota (sede sede norte): Fallo en sistema · 14:32"
    )
    assert texts.alarm_headline(alarm, COTA) == texts.event_text(event, COTA)
    rojo = OpenAlarm(
        id="e2", empresa="chia", sede="", tipo="semaforos", tipo_alarma="ROJO",
        descripcion="", opened_at=0.0, received_ns=T_NS,
    )  # fmt: skip
    assert texts.alarm_headline(rojo, None) == (
        "🔴 SEMÁFORO ROJO — empresa «chia» (no configurada) · 14:32"
    )
