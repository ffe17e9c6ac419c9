"""The status model: ``/api/status``, the counter invariant, the queue gauges with
each sink's stall report, and the open-alarm gauges, built from explicit inputs.

JSON keys are English. The panel protocol's own field names (``empresa``, ``sede``,
``dispositivo``, ``tipo``, ``tipo_alarma``, ``descripcion``) keep their spelling, and
values (colours, states, tipos) stay as panels and operators say them.

The ``empresas`` part is bounded and indexed, whatever panels send: devices are
grouped in one pass (at most :data:`MAX_DEVICES_SHOWN` per empresa, offline first),
alarms come from the board's per-bucket index (capped per empresa), and every
unconfigured empresa is shown in one block, :data:`~botonera_bridge.watch.alarms.UNCONFIGURED`,
with its newest :data:`MAX_UNCONFIGURED_SHOWN` alarms. Each alarm carries its reach
(``reached``: recipients the message was sent to; ``read_by``: who read it) when its
timeline is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from typing import Any, Final

import trio

from ..config import Settings
from ..health import Health
from ..messages import now_rfc3339
from ..metrics import Metrics
from ..queues.link import RedisLink
from ..queues.outbox import DeadLetters, Outbox
from ..queues.streams import DurableStream
from ..redact import mask_urls_in
from ..watch.alarms import UNCONFIGURED, AlarmBook
from ..watch.receipts import Timelines
from ..watch.watchdog import DeviceState

log = logging.getLogger(__name__)

MAX_DEVICES_SHOWN: Final = 500  # panels listed per empresa
MAX_UNCONFIGURED_SHOWN: Final = 50  # alarms listed for the unconfigured empresas
UNCONFIGURED_LABEL: Final = "Empresas sin configurar"
SINKS: Final = ("backend", "whatsapp")
CONNECTED: Final = ("mqtt", "redis", "websocket")  # components that report up/down
QUEUES: Final = ("outbox_backend", "outbox_whatsapp", "inbox", "dead")
GAUGE_PERIOD: Final = 1.0  # seconds between two refreshes of the gauges


class StatusModel:
    """What ``/api/status`` shows and the gauges refreshed once a second (:meth:`run`).

    ``settings`` gives the running configuration (SIGHUP may swap it);
    ``backend_error`` the backend sink's last error ("" when it delivers);
    ``ha`` the replicas' view when ``[ha]`` is enabled.
    """

    def __init__(
        self,
        *,
        settings: Callable[[], Settings],
        health: Health,
        metrics: Metrics,
        link: RedisLink,
        outbox: Outbox,
        inbox: DurableStream,
        inbox_group: str,
        dead: DeadLetters,
        devices: Callable[[Collection[str]], Iterable[DeviceState]],
        book: AlarmBook,
        timelines: Timelines,
        backend_error: Callable[[], str],
        websocket_enabled: bool,
        ha: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._settings = settings
        self._health = health
        self._metrics = metrics
        self._link = link
        self._outbox = outbox
        self._inbox = inbox
        self._inbox_group = inbox_group
        self._dead = dead
        self._devices = devices
        self._book = book
        self._timelines = timelines
        self._backend_error = backend_error
        self._websocket_enabled = websocket_enabled
        self._ha = ha
        self._depth: dict[str, int] = {}
        self._backlog_at_start: dict[str, int] = {}

    def snapshot(self) -> dict[str, Any]:
        """The ``/api/status`` document."""
        h = self._health
        comp = {
            c: {"up": bool(h.up.get(c)), "detail": mask_urls_in(h.why_down.get(c, ""))}
            for c in CONNECTED
        }
        backend_error = self._backend_error()
        comp["backend"] = {"up": not backend_error, "detail": backend_error}
        if not self._websocket_enabled:
            comp["websocket"] = {"up": False, "detail": "desactivado"}
        return {
            "components": comp,
            "empresas": empresas_view(self._settings(), self._devices, self._book, self._timelines),
            "queues": {q: self._depth.get(q, 0) for q in QUEUES},
            "memory_fallback": not self._link.up,
            "invariant": self.invariant(),
            "ha": self._ha() if self._ha is not None else {"enabled": False},
            "counters": counters(self._metrics),
        }

    def invariant(self) -> dict[str, dict[str, int | bool]]:
        """received = delivered + dead-lettered + in flight + queued, per sink.

        Counted for this process: what it appended, plus the backlog it found in the
        outbox at start, must equal what it finished plus what is still there.
        """
        out: dict[str, dict[str, int | bool]] = {}
        for g, done in self._outbox.finished_count.items():
            start = self._backlog_at_start.get(g)
            depth = self._depth.get(f"outbox_{g}", 0)
            received = self._outbox.stream.appended
            delivered = done["ok"] + done["skipped"]
            out[g] = {
                "received": received,
                "backlog_at_start": start if start is not None else -1,
                "delivered": delivered,
                "dead_letters": done["failed"],
                "queued_or_in_flight": depth,
                "holds": start is not None
                and received + start == delivered + done["failed"] + depth,
            }
        return out

    async def run(self) -> None:
        """Refresh queue depths once a second, and from them each sink's stall report:
        one place, the outbox's own counters, for both sinks."""
        finished_before: dict[str, int] = {}
        retries_before: dict[str, float] = {}
        outbox, stream, health = self._outbox, self._outbox.stream, self._health
        while True:
            for g in SINKS:
                retries = self._metrics.registry.get_sample_value(
                    "botonera_retries_total", {"sink": g}
                )
                if retries is not None and retries != retries_before.get(g, retries):
                    health.attempted(g)  # failing against an outage is not being stuck
                retries_before[g] = retries or 0.0
                depth = self._depth[f"outbox_{g}"] = await stream.depth(g)
                finished = sum(outbox.finished_count[g].values())
                self._backlog_at_start.setdefault(g, depth + finished - stream.appended)
                if finished != finished_before.get(g):
                    health.progress(g, depth)
                else:
                    health.waiting(g, depth)
                finished_before[g] = finished
            self._depth["inbox"] = await self._inbox.depth(self._inbox_group)
            self._depth["dead"] = await self._dead_count()
            self._depth["memory"] = stream.memory_items + self._inbox.memory_items
            for queue, n in self._depth.items():
                self._metrics.queue_depth.labels(queue=queue).set(n)
            self._open_alarm_gauges()
            await trio.sleep(GAUGE_PERIOD)

    async def _dead_count(self) -> int:
        dead = len(self._dead.memory)
        if self._link.up and self._link.redis is not None:
            try:
                dead += int(await self._link.redis.execute("XLEN", self._dead.key))
            except Exception as exc:  # noqa: BLE001 - the link notices Redis trouble itself
                log.debug("XLEN %s failed: %s", self._dead.key, exc)
        return dead

    def _open_alarm_gauges(self) -> None:
        """botonera_open_alarms{empresa_bucket}: bounded labels (configured empresas and
        one shared bucket), from the board's own bounded counts."""
        configured = {e.id for e in self._settings().empresas}
        counts = dict.fromkeys([*configured, UNCONFIGURED], 0)
        for empresa, n in self._book.open_counts().items():
            counts[empresa if empresa in configured else UNCONFIGURED] += n
        for bucket, n in counts.items():
            self._metrics.open_alarms.labels(empresa_bucket=bucket).set(n)


def counters(m: Metrics) -> dict[str, float]:
    """Every ``*_total`` counter sample, keyed ``name{label=value,...}``."""
    out: dict[str, float] = {}
    for family in m.registry.collect():
        if family.type != "counter":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{label}}}" if label else sample.name] = sample.value
    return out


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
    board = {
        empresa: [_alarm(a) for a in alarms]
        for empresa, alarms in book.snapshot(unconfigured_limit=MAX_UNCONFIGURED_SHOWN).items()
    }
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
                "name": e.label,
                "semaforo": {"color": sem[0], "since": _rfc(sem[1])} if sem else None,
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
                "alarms": _with_reach(board.get(e.id, []), timelines),
            }
        )
    others = [
        a | {"empresa": empresa}
        for empresa, alarms in board.items()
        if empresa not in configured
        for a in alarms
    ]
    if others:
        others.sort(key=lambda a: (a["ack"] is None, a["since"]), reverse=True)
        block: dict[str, Any] = {
            "id": UNCONFIGURED,
            "name": UNCONFIGURED_LABEL,
            "semaforo": None,
            "devices": [],
            "alarms": _with_reach(others[:MAX_UNCONFIGURED_SHOWN], timelines),
            "alarms_total": book.bucket_size(UNCONFIGURED),
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


def _alarm(a: dict[str, Any]) -> dict[str, Any]:
    """One board entry (``AlarmBook.snapshot``) under English keys."""
    ack = a["acuse"]
    return {
        "id": a["id"],
        "tipo": a["tipo"],
        "tipo_alarma": a["tipo_alarma"],
        "descripcion": a["descripcion"],
        "sede": a["sede"],
        "dispositivo": a["dispositivo"],
        "since": a["desde"],
        "reminders": a["avisos"],
        "ack": {"by": ack["por"], "at": ack["en"]} if ack is not None else None,
    }


def _rfc(wall: float) -> str:
    return now_rfc3339(int(wall * 1e9))
