"""The status model: the ``empresas`` part of ``/api/status``, built from explicit inputs.

Bounded and indexed, whatever panels send: devices are grouped in one pass (at most
:data:`MAX_DEVICES_SHOWN` per empresa, offline first), alarms come from the board's
per-bucket index (capped per empresa), and every unconfigured empresa is shown in
one block, :data:`~botonera_bridge.alarms.UNCONFIGURED`, with its newest
:data:`MAX_UNCONFIGURED_SHOWN` alarms. Each alarm carries its reach
(``avisados``: recipients the message was sent to; ``leidos``: who read it) when
its timeline is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any, Final

from ..alarms import UNCONFIGURED, AlarmBook
from ..config import Settings
from ..messages import now_rfc3339
from ..receipts import Timelines
from ..watchdog import DeviceState

MAX_DEVICES_SHOWN: Final = 500  # panels listed per empresa
MAX_UNCONFIGURED_SHOWN: Final = 50  # alarms listed for the unconfigured empresas
UNCONFIGURED_LABEL: Final = "Empresas sin configurar"


def empresas_view(
    settings: Settings,
    devices: Callable[[Collection[str]], Iterable[DeviceState]],
    book: AlarmBook,
    timelines: Timelines | None,
) -> list[dict[str, Any]]:
    """``devices(empresas)`` gives the devices of those empresas (``Watchdog.devices_of``)."""
    configured = {e.id for e in settings.empresas}
    per_empresa: dict[str, list[DeviceState]] = {e: [] for e in configured}
    for d in devices(configured):
        mine = per_empresa.get(d.empresa)
        if mine is not None:
            mine.append(d)
    board = book.snapshot(unconfigured_limit=MAX_UNCONFIGURED_SHOWN)
    out = []
    for e in settings.empresas:
        sem = book.semaforo(e.id)
        mine = per_empresa[e.id]
        if len(mine) > MAX_DEVICES_SHOWN:  # offline first, then by key
            mine.sort(key=lambda d: (d.state == "online", d.key))
            mine = mine[:MAX_DEVICES_SHOWN]
        mine.sort(key=lambda d: d.key)
        out.append(
            {
                "id": e.id,
                "nombre": e.label,
                "semaforo": {"color": sem[0], "desde": _rfc(sem[1])} if sem else None,
                "devices": [
                    {
                        "key": d.key,
                        "sede": d.sede,
                        "dispositivo": d.dispositivo,
                        "state": d.state,
                        "last_seen": _rfc(d.last_seen),
                    }
                    for d in mine
                ],
                "alarmas": _with_reach(board.get(e.id, []), timelines),
            }
        )
    others = [
        dict(a, empresa=empresa)
        for empresa, alarms in board.items()
        if empresa not in configured
        for a in alarms
    ]
    if others:
        others.sort(key=lambda a: (a["acuse"] is None, a["desde"]), reverse=True)
        block: dict[str, Any] = {
            "id": UNCONFIGURED,
            "nombre": UNCONFIGURED_LABEL,
            "semaforo": None,
            "devices": [],
            "alarmas": _with_reach(others[:MAX_UNCONFIGURED_SHOWN], timelines),
            "alarmas_total": book.bucket_size(UNCONFIGURED),
        }
        out.append(block)
    return out


def _with_reach(alarms: list[dict[str, Any]], timelines: Timelines | None) -> list[dict[str, Any]]:
    if timelines is None:
        return alarms
    for a in alarms:
        reach = timelines.summary(a["id"])
        if reach is not None:
            a.update(reach)
    return alarms


def _rfc(wall: float) -> str:
    return now_rfc3339(int(wall * 1e9))
