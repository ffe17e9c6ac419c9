"""WhatsApp texts: pure functions, Spanish, short.

Every alert text says the empresa (its display name), the sede, what happened and
when (America/Bogota wall-clock time, HH:MM), e.g.::

    🚨 ALARMA CRITICA — Cota (sede principal): Fallo en sistema · 14:32

Nothing here does I/O; the time of an event is its ``received_ns`` (wall clock).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import TYPE_CHECKING, Final

from ..config import Empresa
from ..ids import fold
from ..messages import Event

if TYPE_CHECKING:
    from ..watch.alarms import OpenAlarm

# Bogotá: Colombia has had no DST since 1993, so UTC-5 is exact, needs no tzdata on slim
# images, and keeps zoneinfo (0.7 MB) out of idle RSS.
TZ: Final = dt.timezone(dt.timedelta(hours=-5), "COT")

#: colour -> (emoji, label)
SEMAFOROS: Final[dict[str, tuple[str, str]]] = {
    "VERDE": ("🟢", "normal"),
    "AMARILLO": ("🟡", "precaución"),
    "NARANJA": ("🟠", "alerta"),
    "ROJO": ("🔴", "emergencia"),
    "AZUL": ("🔵", "código azul — emergencia médica"),
}
PRUEBA: Final = "[PRUEBA]"
NO_DESCRIPTION: Final = "sin descripción"
ELLIPSIS: Final = "…"
MAX_TEXT: Final = 4096  # characters of one WhatsApp text (Cloud API limit)
MAX_PARAM: Final = 1024  # characters of one template body parameter

#: which panel messages are worth a WhatsApp message (prueba events always are)
_ALWAYS: Final = frozenset({"alarmas", "semaforos"})


def clock_time(received_ns: int) -> str:
    """'14:32' in Bogota time; ``0`` means now."""
    ns = received_ns or time.time_ns()
    return dt.datetime.fromtimestamp(ns / 1e9, TZ).strftime("%H:%M")


def notifies(event: Event) -> bool:
    """Whether an outbox event becomes a WhatsApp message.

    alarmas and semaforos always; estado from the watchdog (offline/online) and
    estado ``offline`` reported by a panel itself; prueba events always;
    configuracion and heartbeat never.
    """
    if event.prueba or event.tipo in _ALWAYS:
        return True
    if event.tipo == "estado":
        status = _status(event)
        if event.origen == "watchdog":
            return status in ("offline", "online")
        return status == "offline"
    return False


def semaforo(colour: str) -> tuple[str, str, str]:
    """(emoji, COLOUR, label) for a semáforo value; unknown values are shown as is."""
    key = fold(colour).upper()
    if key in SEMAFOROS:
        emoji, label = SEMAFOROS[key]
        return emoji, key, label
    return "🚦", colour.strip() or "?", ""


def place(event: Event, empresa: Empresa | None) -> str:
    """'Cota (sede principal)', or the raw id and that it is not configured."""
    panel = event.dispositivo if event.tipo == "estado" else ""
    return place_of(event.empresa, event.sede, empresa, panel=panel)


def place_of(empresa_id: str, sede: str, empresa: Empresa | None, *, panel: str = "") -> str:
    """:func:`place` from the parts: 'Cota (sede principal, panel p1)'."""
    name = empresa_name(empresa_id, empresa)
    extras: list[str] = []
    if sede:
        extras.append(f"sede {_human(sede)}")
    if panel:
        extras.append(f"panel {_human(panel)}")
    return f"{name} ({', '.join(extras)})" if extras else name


def empresa_name(empresa_id: str, empresa: Empresa | None) -> str:
    """'Cota', or the raw id and that it is not configured."""
    if empresa is not None:
        return empresa.label
    if empresa_id:
        return f"empresa «{empresa_id}» (no configurada)"
    return "empresa sin identificar"


def alarm_label(alarm: OpenAlarm, empresa: Empresa | None) -> str:
    """An alarm of the board for replies and reminders that say «Alarma» themselves:
    'CRITICA — Cota (sede principal): Fallo en sistema · 14:32', a semáforo
    '🔴 SEMÁFORO ROJO — Cota · 14:32'."""
    if alarm.tipo == "semaforos":
        emoji, colour, _ = semaforo(alarm.tipo_alarma)
        what = f"{emoji} SEMÁFORO {colour}"
    else:
        what = alarm.tipo_alarma or "sin tipo"
    text = f"{what} — {place_of(alarm.empresa, alarm.sede, empresa)}"
    if alarm.descripcion:
        text += f": {alarm.descripcion}"
    return f"{text} · {clock_time(alarm.received_ns)}"


def alarm_headline(alarm: OpenAlarm, empresa: Empresa | None) -> str:
    """An alarm of the board as its first notice put it: '🚨 ALARMA CRITICA — Cota …'."""
    label = alarm_label(alarm, empresa)
    return label if alarm.tipo == "semaforos" else f"🚨 ALARMA {label}"


def count_suffix(count: int, span_seconds: float) -> str:
    """'(×10 en 1 min)' for a coalesced message; '' for a single event."""
    if count <= 1:
        return ""
    minutes = max(1, math.ceil(span_seconds / 60.0 - 1e-9))
    return f"(×{count} en {minutes} min)"


def escalation_prefix(attempt: int, total: int) -> str:
    """'⚠️ SIN ATENDER (aviso 2/3)'."""
    return f"⚠️ SIN ATENDER (aviso {attempt}/{total})"


def headline(event: Event) -> tuple[str, str, str]:
    """(emoji, what, detail) of an event: ('🚨', 'ALARMA CRITICA', 'Fallo en sistema')."""
    d = event.detail
    if event.tipo == "alarmas":
        tipo = d.get("tipo_alarma", "").strip()
        what = f"ALARMA {tipo}" if tipo else "ALARMA"
        return "🚨", what, d.get("descripcion", "").strip() or NO_DESCRIPTION
    if event.tipo == "semaforos":
        emoji, colour, label = semaforo(d.get("tipo_alarma", ""))
        return emoji, f"SEMÁFORO {colour}", label
    if event.tipo == "estado":
        status = _status(event)
        if status == "offline":
            why = (
                "sin señal del panel" if event.origen == "watchdog" else "el panel reportó offline"
            )
            return "📴", "PANEL SIN CONEXIÓN", why
        if status == "online":
            return "✅", "PANEL EN LÍNEA", "volvió a reportar"
        return "ℹ️", "ESTADO", d.get("status", "") or "desconocido"
    return "ℹ️", event.tipo.upper() or "MENSAJE", ""


def event_text(
    event: Event,
    empresa: Empresa | None,
    *,
    count: int = 1,
    span_seconds: float = 0.0,
    escalation: tuple[int, int] | None = None,
) -> str:
    """The text of one notification (possibly carrying ``count`` identical events)."""
    emoji, what, detail = headline(event)
    text = f"{emoji} {what} — {place(event, empresa)}"
    if detail:
        text += f": {detail}"
    suffix = count_suffix(count, span_seconds)
    if suffix:
        text += f" {suffix}"
    text += f" · {clock_time(event.received_ns)}"
    if event.prueba:
        text = f"{PRUEBA} {text}"
    if escalation is not None:
        text = f"{escalation_prefix(*escalation)} {text}"
    return text


def summary_text(event: Event, empresa: Empresa | None, repeats: int, *, last_ns: int = 0) -> str:
    """After a coalescing window: '🔁 ALARMA CRITICA — Cota: Fallo… se repitió 3 veces más'."""
    _, what, detail = headline(event)
    veces = "vez" if repeats == 1 else "veces"
    text = f"🔁 {what} — {place(event, empresa)}"
    if detail:
        text += f": {detail}"
    return f"{text} · se repitió {repeats} {veces} más (hasta {clock_time(last_ns)})"


def line_text(
    event: Event,
    empresa: Empresa | None,
    *,
    count: int = 1,
    with_empresa: bool = True,
    limit: int = 300,
) -> str:
    """One line of a digest: '🚨 ALARMA CRITICA — sede norte: Incendio norte ×3 · 14:32'.

    ``with_empresa=False`` when the digest's header already names the one empresa.
    The detail is cut so one long description cannot crowd out the other lines.
    """
    emoji, what, detail = headline(event)
    where = place(event, empresa) if with_empresa else _where(event)
    text = f"{emoji} {what}" + (f" — {where}" if where else "")
    if detail:
        text += f": {one_line(detail, limit)}"
    if count > 1:
        text += f" ×{count}"
    text += f" · {clock_time(event.received_ns)}"
    return f"{PRUEBA} {text}" if event.prueba else text


def panels_text(events: list[Event], empresa: Empresa | None, *, shown: int = 10) -> str:
    """Several panels of one empresa changing state together (watchdog), one line:
    '📴 12 paneles sin conexión — Cota: principal/hb1, principal/hb2, … y 2 más · 14:32'."""
    first = events[0]
    emoji, _, _ = headline(first)
    state = "en línea" if _status(first) == "online" else "sin conexión"
    name = empresa_name(first.empresa, empresa)
    names = [f"{_human(e.sede) or '-'}/{_human(e.dispositivo) or '-'}" for e in events[:shown]]
    more = f" y {len(events) - shown} más" if len(events) > shown else ""
    when = clock_time(max(e.received_ns for e in events))
    return f"{emoji} {len(events)} paneles {state} — {name}: {', '.join(names)}{more} · {when}"


def digest_header(emoji: str, count: int, noun: str, names: list[str]) -> str:
    """'🚨 6 alertas — Cota' (the names of every empresa the digest is about)."""
    return f"{emoji} {count} {noun} — {', '.join(names)}" if names else f"{emoji} {count} {noun}"


def more_text(hidden: int) -> str:
    """The last line of a digest longer than its shown lines."""
    return f"… y {hidden} más (responda ESTADO para ver las alarmas abiertas)"


def unknown_to_backend_text(event: Event) -> str:
    """For ``central`` when the backend does not know an event's empresa/sede."""
    sede = f", sede «{event.sede}»" if event.sede else ""
    _, what, _ = headline(event)
    return (
        f"⚠️ El backend no reconoce la empresa «{event.empresa}»{sede}: "
        f"{what} quedó en dead letters (botonera-bridge dead-letters list) · "
        f"{clock_time(event.received_ns)}"
    )


def template_params(
    event: Event, empresa: Empresa | None, *, count: int = 1, span_seconds: float = 0.0
) -> tuple[str, str, str]:
    """Body parameters of the approved template: (empresa, tipo, detalle)."""
    _, what, detail = headline(event)
    if event.prueba:
        what = f"{PRUEBA} {what}"
    detalle = " ".join(p for p in (detail, count_suffix(count, span_seconds)) if p)
    when = clock_time(event.received_ns)
    return place(event, empresa), what, f"{detalle} · {when}" if detalle else when


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to at most ``limit`` characters, ending in "…" when cut.

    Counted in UTF-16 code units (how WhatsApp counts: an emoji may be two), so
    the result also fits however the provider counts.
    """
    if len(text) <= limit // 2 or _utf16_len(text) <= limit:
        return text
    room = max(0, limit - len(ELLIPSIS))
    cut = text[:room]
    while (excess := _utf16_len(cut) - room) > 0:
        cut = cut[: -((excess + 1) // 2)]
    return cut.rstrip() + ELLIPSIS


def one_line(text: str, limit: int = MAX_PARAM) -> str:
    """A template parameter: whitespace runs (newlines, tabs) folded to one space, clipped."""
    return clip(" ".join(text.split()), limit)


def _status(event: Event) -> str:
    return fold(event.detail.get("status", ""))


def _where(event: Event) -> str:
    """'sede norte' / 'sede norte, panel p1' without the empresa (a digest names it once)."""
    parts: list[str] = []
    if event.sede:
        parts.append(f"sede {_human(event.sede)}")
    if event.tipo == "estado" and event.dispositivo:
        parts.append(f"panel {_human(event.dispositivo)}")
    return ", ".join(parts)


def _human(ident: str) -> str:
    return ident.replace("_", " ").replace("-", " ")
