"""The board of open alarms and current semáforos, and when to escalate them.

The router calls :meth:`AlarmBook.observe` for every event. An ``alarmas`` event,
and a ``semaforos`` event turning ``ROJO`` or ``AZUL``, opens an alarm; ``ACK`` on
WhatsApp acknowledges it (:meth:`AlarmBook.acknowledge`), which stops its
reminders. An alarm nobody acknowledges is escalated at ``after``, ``2×after``…
up to ``escalation_max`` times (:meth:`AlarmBook.due`).

State lives in a :class:`~botonera_bridge.queues.state.HashStore` (the ``alarms`` hash):
field ``a:<event id>`` holds an alarm, ``s:<empresa>`` the empresa's semáforo,
both as JSON. Call ``await store.load()`` before building the book (or
:meth:`AlarmBook.reload` after); the book writes itself through to Redis in
:meth:`AlarmBook.run` (a task of its own, started by ``app.run``).

Times come from the injected ``clock`` (wall seconds, so they survive restarts;
tests pass ``trio.current_time`` under ``autojump_clock``). Acknowledged alarms
stay visible for :data:`ACKED_TTL`, then are forgotten; at most
:data:`MAX_PER_EMPRESA` alarms are kept per empresa (acknowledged ones go first).
Empresas that are not configured (``configured`` says) all share one bucket,
:data:`UNCONFIGURED`, with the same cap, and the whole board holds at most
:data:`MAX_ALARMS`: whatever panels send, the board and every read of it stay
small. Alarms are indexed per bucket, so reading one empresa never scans the rest.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
import trio

from ..ids import fold, mask_phone
from ..messages import Event, now_rfc3339
from ..queues.state import HashStore

log = logging.getLogger(__name__)

ACKED_TTL: Final = 24 * 3600.0  # seconds an acknowledged alarm stays on the board
MAX_PER_EMPRESA: Final = 200  # alarms kept per empresa
ALARM_COLOURS: Final = frozenset({"ROJO", "AZUL"})  # semáforos that open an alarm
MIN_REF: Final = 4  # shortest event-id prefix accepted by acknowledge()
MAX_ALARMS: Final = 2000  # alarms on the whole board
UNCONFIGURED: Final = "sin_configurar"  # the one bucket of every unconfigured empresa
FLUSH_INTERVAL: Final = 1.0  # seconds between writes of a changed board
FINAL_FLUSH_TIMEOUT: Final = 2.0  # seconds for the last write, on the way out

_FROM_EVENT: Final = ("id", "empresa", "sede", "dispositivo", "tipo", "received_ns")
_ALARM: Final = "a:"
_SEMAFORO: Final = "s:"


class OpenAlarm(msgspec.Struct, frozen=True, kw_only=True):
    """One alarm on the board (open, or acknowledged and kept for a while)."""

    id: str  # the event id
    empresa: str  # "" when the panel did not say
    sede: str
    dispositivo: str = ""
    tipo: str  # alarmas | semaforos
    tipo_alarma: str  # CRITICA…, or the colour for semaforos
    descripcion: str
    opened_at: float  # clock seconds
    received_ns: int = 0  # wall clock of the event, for texts
    escalations: int = 0  # reminders already sent
    acked_by: str = ""  # E.164 of who acknowledged it
    acked_at: float | None = None

    @property
    def acked(self) -> bool:
        return self.acked_at is not None


class Semaforo(msgspec.Struct, frozen=True, kw_only=True):
    colour: str  # upper-case, accents folded: VERDE, ROJO, …
    since: float  # clock seconds of the event that set it
    sede: str = ""
    event_id: str = ""


_encode: Final = msgspec.json.Encoder().encode
_decode_alarm: Final = msgspec.json.Decoder(OpenAlarm).decode
_decode_semaforo: Final = msgspec.json.Decoder(Semaforo).decode


def colour_of(value: str) -> str:
    """'Rojo ' / 'rojo' / 'ROJO' -> 'ROJO' (any string is accepted)."""
    return fold(value).upper()


class AlarmBook:
    """Open alarms and semáforos per empresa; synchronous, cheap, no I/O but ``flush``."""

    def __init__(
        self,
        store: HashStore,
        *,
        escalation_after: float,
        escalation_max: int,
        clock: Callable[[], float] = time.time,
        configured: Callable[[str], bool] | None = None,
        max_alarms: int = MAX_ALARMS,
    ) -> None:
        if escalation_after <= 0:
            raise ValueError("escalation_after must be positive")
        self.store = store
        self.after = escalation_after
        self.max = max(0, escalation_max)
        self.clock = clock
        self._configured = configured
        self.max_alarms = max(1, max_alarms)
        self._alarms: dict[str, OpenAlarm] = {}
        self._buckets: dict[str, dict[str, OpenAlarm]] = {}
        self._last_sweep = -math.inf
        self._forgotten: Counter[str] = Counter()
        self._warned: dict[str, float] = {}
        self._semaforos: dict[str, Semaforo] = {}
        self.reload()

    # -- persistence ------------------------------------------------------------------

    def reload(self) -> None:
        """Rebuild the board from the store's mirror (after ``await store.load()``)."""
        self._alarms.clear()
        self._buckets.clear()
        self._semaforos.clear()
        for field, raw in list(self.store.data.items()):
            try:
                if field.startswith(_ALARM):
                    self._put(_decode_alarm(raw), write=False)
                elif field.startswith(_SEMAFORO):
                    self._semaforos[field[len(_SEMAFORO) :]] = _decode_semaforo(raw)
            except msgspec.DecodeError as exc:
                log.warning("dropping unreadable %s field %r: %s", self.store.key, field, exc)
                self.store.delete(field)
        self._prune(self.clock())

    async def flush(self) -> bool:
        """Write pending changes through to Redis; True when nothing is left."""
        return await self.store.flush()

    async def run(
        self,
        *,
        before_flush: Sequence[Callable[[], object]] = (),
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Write the board through to Redis every :data:`FLUSH_INTERVAL` while it
        changed, and once more on the way out (shielded, at most
        :data:`FINAL_FLUSH_TIMEOUT`). ``before_flush`` runs first each time: whatever
        else keeps its state in the same hash (the timelines' ``sync``)."""
        task_status.started()
        try:
            while True:
                await self._write_through(before_flush)
                await trio.sleep(FLUSH_INTERVAL)
        finally:
            with trio.move_on_after(FINAL_FLUSH_TIMEOUT, shield=True):
                await self._write_through(before_flush)

    async def _write_through(self, before_flush: Sequence[Callable[[], object]]) -> None:
        for sync in before_flush:
            sync()
        if self.dirty:
            await self.flush()
        else:
            await trio.lowlevel.checkpoint()

    @property
    def dirty(self) -> bool:
        return self.store.dirty > 0

    def bucket(self, empresa: str) -> str:
        """Where an empresa's alarms are counted: itself, or :data:`UNCONFIGURED`."""
        if self._configured is None or self._configured(empresa):
            return empresa
        return UNCONFIGURED

    def _put(self, alarm: OpenAlarm, *, write: bool = True) -> None:
        self._alarms[alarm.id] = alarm
        self._buckets.setdefault(self.bucket(alarm.empresa), {})[alarm.id] = alarm
        if write:
            self.store.set(_ALARM + alarm.id, _encode(alarm))

    def _forget(self, alarm_id: str) -> None:
        gone = self._alarms.pop(alarm_id, None)
        if gone is not None:
            key = self.bucket(gone.empresa)
            mine = self._buckets.get(key)
            if mine is not None:
                mine.pop(alarm_id, None)
                if not mine:
                    del self._buckets[key]
        self.store.delete(_ALARM + alarm_id)

    def _of(self, empresa: str) -> list[OpenAlarm]:
        """The alarms of one empresa, from its bucket's index (never the whole board)."""
        mine = self._buckets.get(self.bucket(empresa), {})
        return [a for a in mine.values() if a.empresa == empresa]

    # -- writers ----------------------------------------------------------------------

    def observe(self, event: Event) -> OpenAlarm | None:
        """Record one event; returns the alarm it opened, if any.

        Idempotent by event id (an MQTT redelivery opens nothing new). Send-test
        events (``prueba``) never open alarms. A semáforo ROJO/AZUL opens an alarm
        unless the same colour is already open and unacknowledged for that sede.
        """
        if event.prueba or event.id in self._alarms:
            return None
        now = self.clock()
        opened: OpenAlarm | None = None
        if event.tipo == "alarmas":
            opened = self._open(event, now, event.detail.get("tipo_alarma", ""))
        elif event.tipo == "semaforos":
            colour = colour_of(event.detail.get("tipo_alarma", ""))
            if not colour:
                return None
            self._semaforos[event.empresa] = Semaforo(
                colour=colour, since=now, sede=event.sede, event_id=event.id
            )
            self.store.set(_SEMAFORO + event.empresa, _encode(self._semaforos[event.empresa]))
            if colour in ALARM_COLOURS and not self._same_open(event, colour):
                opened = self._open(event, now, colour)
        if opened is not None:
            self._prune(now, event.empresa)
        return opened

    def _open(self, event: Event, now: float, tipo_alarma: str) -> OpenAlarm:
        alarm = OpenAlarm(
            tipo_alarma=tipo_alarma.strip(),
            descripcion=event.detail.get("descripcion", "").strip(),
            opened_at=now,
            **{name: getattr(event, name) for name in _FROM_EVENT},
        )
        self._put(alarm)
        return alarm

    def _same_open(self, event: Event, colour: str) -> bool:
        return any(
            a.tipo == "semaforos" and a.sede == event.sede and a.tipo_alarma == colour
            for a in self.open_alarms(event.empresa)
        )

    def acknowledge(self, empresa: str, by: str, event_id: str | None = None) -> OpenAlarm | None:
        """Mark the newest unacknowledged alarm of ``empresa`` (or the one ``event_id``
        names, a full id or a unique prefix of at least :data:`MIN_REF` characters)
        as acknowledged by ``by``. Returns the updated alarm, or None when there is
        nothing to acknowledge (none open, unknown id, or already acknowledged).
        """
        if event_id is None:
            candidates = self.open_alarms(empresa)
            target = candidates[0] if candidates else None
        else:
            target = self.find(empresa, event_id)
        if target is None or target.acked:
            return None
        acked = msgspec.structs.replace(target, acked_by=by, acked_at=self.clock())
        self._put(acked)
        return acked

    def find(self, empresa: str, ref: str) -> OpenAlarm | None:
        """The alarm of ``empresa`` (open or acknowledged) whose id is ``ref`` or
        starts with it (case-insensitive, at least :data:`MIN_REF` characters)."""
        ref = ref.strip().lower()
        exact = self._alarms.get(ref)
        if exact is not None and exact.empresa == empresa:
            return exact
        if len(ref) < MIN_REF:
            return None
        matches = [a for a in self._of(empresa) if a.id.lower().startswith(ref)]
        return matches[0] if len(matches) == 1 else None

    def due(self, now: float) -> list[OpenAlarm]:
        """Unacknowledged alarms whose next reminder time has passed, marked as escalated.

        Reminder k (1…max) is due at ``opened_at + k × after``. After a long outage
        only the latest passed reminder is sent, so people get one message, not a
        burst. Oldest first.
        """
        out: list[OpenAlarm] = []
        for alarm in sorted(self._alarms.values(), key=lambda a: (a.opened_at, a.id)):
            if alarm.acked or alarm.escalations >= self.max:
                continue
            if now < self._next_time(alarm):
                continue
            passed = math.floor((now - alarm.opened_at) / self.after + 1e-9)
            step = min(self.max, max(alarm.escalations + 1, passed))
            updated = msgspec.structs.replace(alarm, escalations=step)
            self._put(updated)
            out.append(updated)
        if out:
            self._prune(now)
        return out

    def _next_time(self, alarm: OpenAlarm) -> float:
        return alarm.opened_at + (alarm.escalations + 1) * self.after

    def next_due(self) -> float | None:
        """When the next reminder falls due (clock seconds), or None."""
        times = [
            self._next_time(a)
            for a in self._alarms.values()
            if not a.acked and a.escalations < self.max
        ]
        return min(times) if times else None

    def _prune(self, now: float, empresa: str | None = None) -> None:
        """Forget acknowledged alarms older than ACKED_TTL; keep MAX_PER_EMPRESA per
        bucket and MAX_ALARMS on the board.

        Cheap on the hot path: the TTL sweep runs at most once a minute, and a bucket
        (or the board) over its limit is cut back to 90% of it, so the sort runs once
        per tenth of the limit in new alarms, not for every one.
        """
        if empresa is None or now - self._last_sweep >= 60:
            self._last_sweep = now
            for alarm in list(self._alarms.values()):
                if alarm.acked_at is not None and now - alarm.acked_at >= ACKED_TTL:
                    self._forget(alarm.id)
        buckets = [self.bucket(empresa)] if empresa is not None else list(self._buckets)
        for key in buckets:
            mine = self._buckets.get(key, {})
            if len(mine) > MAX_PER_EMPRESA:
                self._cut(now, key, list(mine.values()), MAX_PER_EMPRESA)
        if len(self._alarms) > self.max_alarms:
            self._cut(now, "*", list(self._alarms.values()), self.max_alarms)

    def _cut(self, now: float, key: str, alarms: list[OpenAlarm], limit: int) -> None:
        # acknowledged first, then oldest first
        alarms.sort(key=lambda a: (not a.acked, a.opened_at, a.id))
        cut = alarms[: len(alarms) - limit * 9 // 10]
        for alarm in cut:
            self._forget(alarm.id)
        self._forgotten[key] += len(cut)
        if now - self._warned.get(key, -math.inf) >= 60:  # one line a minute, not per alarm
            self._warned[key] = now
            what = "the whole board" if key == "*" else f"alarm board of {key or '-'}"
            log.warning(
                "%s over %d alarms: forgot the %d oldest since the last warning "
                "(they were delivered; the board only shows the newest)",
                what,
                limit,
                self._forgotten.pop(key),
            )

    # -- readers ----------------------------------------------------------------------

    def open_alarms(self, empresa: str) -> list[OpenAlarm]:
        """Unacknowledged alarms of ``empresa``, newest first."""
        mine = [a for a in self._of(empresa) if not a.acked]
        mine.sort(key=lambda a: (a.opened_at, a.received_ns, a.id), reverse=True)
        return mine

    def acked_alarms(self, empresa: str) -> list[OpenAlarm]:
        """Acknowledged alarms still on the board, newest acknowledgement first."""
        mine = [a for a in self._of(empresa) if a.acked]
        mine.sort(key=lambda a: (a.acked_at or 0.0, a.id), reverse=True)
        return mine

    def get(self, alarm_id: str) -> OpenAlarm | None:
        return self._alarms.get(alarm_id)

    def semaforo(self, empresa: str) -> tuple[str, float] | None:
        """(colour, since) of the empresa's current semáforo, or None if never seen."""
        s = self._semaforos.get(empresa)
        return (s.colour, s.since) if s is not None else None

    def snapshot(self, unconfigured_limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
        """Plain data for ``/api/status`` and the status page: empresa -> alarms.

        Unacknowledged alarms first (newest first), then acknowledged ones still on
        the board (newest acknowledgement first). Each alarm is ``{"id", "tipo",
        "tipo_alarma", "descripcion", "sede", "dispositivo", "desde" (RFC 3339),
        "avisos" (reminders sent), "acuse": None | {"por" (masked number), "en"}}``.
        Empresa ``""`` collects alarms whose panel named no empresa. With
        ``unconfigured_limit``, only that many of the :data:`UNCONFIGURED` bucket.
        """
        self._prune(self.clock())
        out: dict[str, list[dict[str, Any]]] = {}
        for key, mine in self._buckets.items():  # bounded: MAX_PER_EMPRESA per bucket
            opened = sorted(
                (a for a in mine.values() if not a.acked),
                key=lambda a: (a.opened_at, a.received_ns, a.id),
                reverse=True,
            )
            acked = sorted(
                (a for a in mine.values() if a.acked),
                key=lambda a: (a.acked_at or 0.0, a.id),
                reverse=True,
            )
            shown = opened + acked
            if key == UNCONFIGURED and unconfigured_limit is not None:
                shown = shown[:unconfigured_limit]
            for a in shown:
                out.setdefault(a.empresa, []).append(_public(a))
        return dict(sorted(out.items()))

    def open_counts(self) -> dict[str, int]:
        """Unacknowledged alarms on the board per empresa: what the gauges need, without
        the snapshot's sorting and formatting of every alarm."""
        self._prune(self.clock())
        out: dict[str, int] = {}
        for alarm in self._alarms.values():
            if not alarm.acked:
                out[alarm.empresa] = out.get(alarm.empresa, 0) + 1
        return out

    def bucket_size(self, key: str) -> int:
        return len(self._buckets.get(key, {}))


def _rfc3339(seconds: float) -> str:
    return now_rfc3339(int(seconds * 1e9))


def _public(alarm: OpenAlarm) -> dict[str, Any]:
    acuse = None
    if alarm.acked_at is not None:
        por = mask_phone(alarm.acked_by) if alarm.acked_by else ""
        acuse = {"por": por, "en": _rfc3339(alarm.acked_at)}
    return {
        "id": alarm.id,
        "tipo": alarm.tipo,
        "tipo_alarma": alarm.tipo_alarma,
        "descripcion": alarm.descripcion,
        "sede": alarm.sede,
        "dispositivo": alarm.dispositivo,
        "desde": _rfc3339(alarm.opened_at),
        "avisos": alarm.escalations,
        "acuse": acuse,
    }
