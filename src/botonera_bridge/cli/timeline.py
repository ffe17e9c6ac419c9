"""``botonera-bridge timeline <event id>``: one alarm's timeline from a running bridge.

Reads ``GET /api/alarms/<event id>`` from the bridge's status server (``status.listen``,
with ``status.token`` when set) and prints it in Spanish, America/Bogota time.
Numbers arrive masked from the server; nothing here sees a full one.
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Final

from ..config import Settings
from ..errors import BridgeError
from ..sinks.texts import TZ

FETCH_TIMEOUT: Final = 5.0  # seconds for the status server to answer
STATES: Final = {
    "pending": "pendiente",
    "sent": "enviado",
    "delivered": "entregado",
    "read": "leído",
    "failed": "fallido",
}
ESCALATIONS: Final = {"recordatorio": "recordatorio", "sin_leer": "sin leer → central"}


class TimelineError(BridgeError):
    """Raised when the bridge cannot be asked or does not know the alarm; the text is Spanish."""


def status_url(settings: Settings, path: str) -> str:
    listen = settings.status.listen
    if not listen:
        raise TimelineError("status.listen está vacío: el puente no sirve su estado")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a listen address, read to connect locally
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def fetch(settings: Settings, event_id: str) -> dict[str, Any]:
    url = status_url(settings, "/api/alarms/" + urllib.parse.quote(event_id.strip(), safe=""))
    req = urllib.request.Request(url)  # noqa: S310 - http to our own status server
    if settings.status.token:
        req.add_header("Authorization", f"Bearer {settings.status.token}")
    where = status_url(settings, "")
    try:
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as resp:  # noqa: S310
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            raise TimelineError(
                f"el puente no conoce la alarma {event_id!r} (o ya pasaron más de 24 h)"
            ) from exc
        if exc.code == 401:
            raise TimelineError("el puente rechazó el token (status.token)") from exc
        raise TimelineError(f"el puente respondió HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TimelineError(
            f"no se pudo consultar el puente en {where} ({reason}); ¿está corriendo?"
        ) from exc
    except ValueError as exc:
        raise TimelineError("el puente respondió algo que no es JSON") from exc


def _hora(iso: Any) -> str:
    if not isinstance(iso, str) or not iso:
        return "—"
    try:
        when = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    return when.astimezone(TZ).strftime("%Y-%m-%d %H:%M:%S")


def render(data: dict[str, Any]) -> str:
    """The timeline as Spanish text, one fact a line."""
    what = str(data.get("tipo_alarma") or "")
    if data.get("tipo") == "semaforos":
        what = f"SEMÁFORO {what}"
    place = str(data.get("empresa") or "empresa sin identificar")
    if data.get("sede"):
        place += f" (sede {data['sede']})"
    lines = [f"Alarma {data.get('id', '?')} — {what or 'sin tipo'} — {place}"]
    if data.get("descripcion"):
        lines.append(f"  {data['descripcion']}")
    lines.append(f"{_hora(data.get('received_at'))}  recibida por el puente")
    backend = data.get("backend") or {}
    if backend.get("at"):
        verdict = "aceptada" if backend.get("accepted") else "rechazada"
        lines.append(f"{_hora(backend['at'])}  backend: {verdict} (HTTP {backend.get('status')})")
    else:
        lines.append("—                    backend: aún sin respuesta")
    recipients = data.get("recipients") or []
    if not recipients:
        lines.append("—                    WhatsApp: nadie avisado aún")
    for r in recipients:
        state = STATES.get(str(r.get("status")), str(r.get("status")))
        lines.append(f"{_hora(r.get('sent_at'))}  WhatsApp a {r.get('number')}: {state}")
        for key, label in (("delivered_at", "entregado"), ("read_at", "leído")):
            if r.get(key):
                lines.append(f"{_hora(r[key])}    {label} por {r.get('number')}")
        if r.get("failed_at"):
            motivo = f": {r['reason']}" if r.get("reason") else ""
            lines.append(f"{_hora(r['failed_at'])}    falló para {r.get('number')}{motivo}")
    for e in data.get("escalations") or []:
        kind = ESCALATIONS.get(str(e.get("kind")), str(e.get("kind")))
        step = f" {e['step']}" if e.get("step") else ""
        to = e.get("to", 0)
        lines.append(f"{_hora(e.get('at'))}  escalamiento ({kind}{step}) a {to} números")
    acuse = data.get("ack")
    if acuse:
        lines.append(f"{_hora(acuse.get('at'))}  atendida por {acuse.get('by') or '?'}")
    else:
        lines.append("—                    sin atender")
    lines.append(
        f"Resumen: avisados {data.get('reached', 0)} · leído por {data.get('read_by', 0)} · "
        + (f"atendida por {acuse.get('by')}" if acuse else "sin atender")
    )
    return "\n".join(lines)
