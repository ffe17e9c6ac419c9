"""Receipts and the alarm timeline: what happened to each alarm, per recipient.

For every alarm the board opens, :class:`Timelines` keeps: when it was received,
the backend's answer (status, time), each recipient's WhatsApp message (provider
message id; sent / delivered / read / failed, with times), who acknowledged it and
when, and the escalations sent. It is the sink's
:class:`~botonera_bridge.sinks.DeliveryObserver`; delivery receipts (Cloud API
webhook statuses, WAHA ``message.ack`` events) arrive as :class:`Receipt` and are
matched through the provider message id.

Bounded: at most :data:`MAX_TIMELINES` alarms (oldest forgotten first), an
acknowledged alarm is kept :data:`KEEP_CLOSED` (24 h), :data:`MAX_RECIPIENTS`
recipients and :data:`MAX_ESCALATIONS` escalations per alarm. Persisted in the
alarm board's hash (field ``t:<event id>``), so Redis keeps it across restarts and
the memory fallback is the hash's own mirror: changes are encoded into the hash by
:meth:`Timelines.sync` (the escalation loop calls it before each write-through,
about once a second), not on every receipt. Every method is synchronous and O(1)
per call (the sink calls it on its path), except :meth:`Timelines.unread_due`,
which walks only the alarms still waiting for a first read.

Full numbers stay inside; :meth:`Timelines.public` masks them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import msgspec

from ..ids import mask_phone
from ..messages import now_rfc3339
from ..queues.state import HashStore

log = logging.getLogger(__name__)

MAX_TIMELINES: Final = 5000  # alarms with a timeline
KEEP_CLOSED: Final = 24 * 3600.0  # seconds an acknowledged alarm's timeline is kept
KEEP_OPEN: Final = 7 * 24 * 3600.0  # seconds an unacknowledged one is kept at most
MAX_RECIPIENTS: Final = 64  # recipients tracked per alarm
MAX_ESCALATIONS: Final = 16  # escalations recorded per alarm
MAX_REASON: Final = 200  # characters of a failure reason kept
STATUSES: Final = ("sent", "delivered", "read")  # in order; "failed" stands apart
_RANK: Final = {"": 0, "sent": 1, "delivered": 2, "read": 3}
_FIELD: Final = "t:"


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery status from the provider for one sent message."""

    message_id: str  # the id the provider answered the send with
    status: str  # sent | delivered | read | failed
    number: str = ""  # E.164 of the recipient, when the provider says
    timestamp: int = 0  # seconds since the epoch, as the provider reported it
    reason: str = ""  # failure detail (error code and title)


class Recipient(msgspec.Struct, kw_only=True):
    number: str  # E.164
    message_id: str = ""
    status: str = ""  # "" | sent | delivered | read | failed
    sent_at: float | None = None
    delivered_at: float | None = None
    read_at: float | None = None
    failed_at: float | None = None
    reason: str = ""


class Escalation(msgspec.Struct, frozen=True, kw_only=True):
    at: float
    kind: str  # recordatorio | sin_leer
    step: int = 0  # reminder number (recordatorio)
    to: int = 0  # how many numbers it went to


class Timeline(msgspec.Struct, kw_only=True):
    id: str  # the event id
    empresa: str
    sede: str = ""
    tipo: str = ""
    tipo_alarma: str = ""
    descripcion: str = ""
    received_at: float
    backend_status: int = 0  # HTTP status of the backend's answer; 0 = not yet
    backend_accepted: bool = False
    backend_at: float | None = None
    recipients: list[Recipient] = []
    acked_by: str = ""  # E.164
    acked_at: float | None = None
    escalations: list[Escalation] = []
    unread_escalated: bool = False

    def recipient(self, number: str) -> Recipient | None:
        for r in self.recipients:
            if r.number == number:
                return r
        return None

    @property
    def reached(self) -> int:
        """Recipients the message was sent to (whatever happened next)."""
        return sum(1 for r in self.recipients if r.sent_at is not None)

    @property
    def read_by(self) -> int:
        return sum(1 for r in self.recipients if r.read_at is not None)

    @property
    def with_receipts(self) -> bool:
        """True once a message of this alarm carries a provider id (receipts can come)."""
        return any(r.message_id for r in self.recipients)


_encode: Final = msgspec.json.Encoder().encode
_decode: Final = msgspec.json.Decoder(Timeline).decode


class Timelines:
    """Timelines of recent alarms; also the WhatsApp sink's DeliveryObserver."""

    def __init__(
        self,
        store: HashStore,
        *,
        clock: Callable[[], float] = time.time,
        max_timelines: int = MAX_TIMELINES,
    ) -> None:
        self.store = store
        self.clock = clock
        self.max = max(1, max_timelines)
        self._lines: OrderedDict[str, Timeline] = OrderedDict()  # oldest first
        self._by_message: dict[str, list[str]] = {}  # provider message id -> event ids
        self._waiting_read: dict[str, float] = {}  # event id -> opened at, not yet read
        self._unsaved: set[str] = set()  # changed since the last sync()
        self.unmatched = 0  # receipts for messages we do not know (old, or not alarms)
        self._last_sweep = 0.0
        self.reload()

    # -- persistence ------------------------------------------------------------------

    def reload(self) -> None:
        """Rebuild from the store's mirror (after ``await store.load()``)."""
        self._lines.clear()
        self._by_message.clear()
        self._waiting_read.clear()
        self._unsaved.clear()
        found: list[Timeline] = []
        for field, raw in list(self.store.data.items()):
            if not field.startswith(_FIELD):
                continue
            try:
                found.append(_decode(raw))
            except msgspec.DecodeError as exc:
                log.warning("dropping unreadable %s field %r: %s", self.store.key, field, exc)
                self.store.delete(field)
        for line in sorted(found, key=lambda t: (t.received_at, t.id)):
            self._index(line)
        self._prune(self.clock())

    def _index(self, line: Timeline) -> None:
        self._lines[line.id] = line
        for r in line.recipients:
            if r.message_id:
                self._link(r.message_id, line.id)
        self._watch(line)

    def _link(self, message_id: str, event_id: str) -> None:
        ids = self._by_message.setdefault(message_id, [])
        if event_id not in ids:
            ids.append(event_id)

    def _watch(self, line: Timeline) -> None:
        waiting = (
            line.acked_at is None
            and not line.unread_escalated
            and line.with_receipts
            and line.read_by == 0
        )
        if waiting:
            self._waiting_read[line.id] = line.received_at
        else:
            self._waiting_read.pop(line.id, None)

    def _save(self, line: Timeline) -> None:
        self._unsaved.add(line.id)

    def sync(self) -> int:
        """Encode the timelines changed since the last call into the store (whose
        ``flush`` then writes them through); returns how many."""
        n = 0
        for event_id in self._unsaved:
            line = self._lines.get(event_id)
            if line is not None:
                self.store.set(_FIELD + event_id, _encode(line))
                n += 1
        self._unsaved.clear()
        return n

    def _forget(self, event_id: str) -> None:
        line = self._lines.pop(event_id, None)
        self._waiting_read.pop(event_id, None)
        self._unsaved.discard(event_id)
        self.store.delete(_FIELD + event_id)
        if line is None:
            return
        for r in line.recipients:
            ids = self._by_message.get(r.message_id)
            if ids is not None:
                if event_id in ids:
                    ids.remove(event_id)
                if not ids:
                    del self._by_message[r.message_id]

    def _prune(self, now: float) -> None:
        while len(self._lines) > self.max:
            self._forget(next(iter(self._lines)))
        if now - self._last_sweep < 60:  # the age sweep runs once a minute, not per call
            return
        self._last_sweep = now
        for line in list(self._lines.values()):
            closed = line.acked_at is not None and now - line.acked_at >= KEEP_CLOSED
            if closed or now - line.received_at >= KEEP_OPEN:
                self._forget(line.id)

    # -- writers ----------------------------------------------------------------------

    def track(self, alarm: Any) -> None:
        """Start the timeline of an alarm the board just opened (``OpenAlarm`` or None)."""
        if alarm is None or alarm.id in self._lines:
            return
        line = Timeline(
            id=alarm.id,
            empresa=alarm.empresa,
            sede=alarm.sede,
            tipo=alarm.tipo,
            tipo_alarma=alarm.tipo_alarma,
            descripcion=alarm.descripcion[:500],
            received_at=alarm.opened_at,
        )
        self._lines[line.id] = line
        self._save(line)
        self._prune(self.clock())

    def backend_result(self, event_id: str, status: int, accepted: bool) -> None:
        """The backend's answer for an event (its sink calls this)."""
        line = self._lines.get(event_id)
        if line is None or line.backend_accepted:
            return
        line.backend_status, line.backend_accepted = status, accepted
        line.backend_at = self.clock()
        self._save(line)

    def sent(self, number: str, message_id: str | None, event_ids: Sequence[str]) -> None:
        now = self.clock()
        for line in self._lines_of(event_ids):
            r = self._recipient(line, number)
            if r is None:
                continue
            if r.sent_at is None:
                r.sent_at = now
            if message_id and not r.message_id:
                r.message_id = message_id
                self._link(message_id, line.id)
            if _RANK.get(r.status, 0) < _RANK["sent"]:
                r.status = "sent"
            self._watch(line)
            self._save(line)

    def failed(self, number: str, event_ids: Sequence[str], reason: str) -> None:
        now = self.clock()
        for line in self._lines_of(event_ids):
            r = self._recipient(line, number)
            if r is None or r.read_at is not None:
                continue
            r.status, r.failed_at, r.reason = "failed", now, reason[:MAX_REASON]
            self._save(line)

    def receipt(self, receipt: Receipt) -> bool:
        """Apply a delivery receipt; False when no tracked message has that id."""
        ids = self._by_message.get(receipt.message_id)
        if not ids:
            self.unmatched += 1
            return False
        now = self.clock()
        for line in self._lines_of(list(ids)):
            for r in line.recipients:
                if r.message_id == receipt.message_id:
                    _apply(r, receipt, now)
            self._watch(line)
            self._save(line)
        return True

    def acknowledged(self, event_id: str, by: str, at: float) -> None:
        line = self._lines.get(event_id)
        if line is None:
            return
        line.acked_by, line.acked_at = by, at
        self._watch(line)
        self._save(line)

    def escalated(self, event_ids: Iterable[str], kind: str, *, to: int, step: int = 0) -> None:
        now = self.clock()
        for line in self._lines_of(list(event_ids)):
            if len(line.escalations) < MAX_ESCALATIONS:
                line.escalations.append(Escalation(at=now, kind=kind, step=step, to=to))
            if kind == "sin_leer":
                line.unread_escalated = True
                self._watch(line)
            self._save(line)

    def _lines_of(self, event_ids: Sequence[str]) -> list[Timeline]:
        return [line for i in event_ids if (line := self._lines.get(i)) is not None]

    def _recipient(self, line: Timeline, number: str) -> Recipient | None:
        r = line.recipient(number)
        if r is None:
            if len(line.recipients) >= MAX_RECIPIENTS:
                return None
            r = Recipient(number=number)
            line.recipients.append(r)
        return r

    # -- unread escalation ------------------------------------------------------------

    def unread_due(self, now: float, after: float) -> list[Timeline]:
        """Alarms sent with receipts that no recipient has read ``after`` seconds after
        they opened (and not yet escalated for it), oldest first."""
        due = [
            line
            for event_id, opened in self._waiting_read.items()
            if now + 1e-6 >= opened + after and (line := self._lines.get(event_id)) is not None
        ]
        due.sort(key=lambda t: (t.received_at, t.id))
        return due

    def unwatch(self, event_id: str) -> None:
        """Stop waiting for a first read of this alarm (acknowledged or forgotten)."""
        self._waiting_read.pop(event_id, None)

    def next_unread_due(self, after: float) -> float | None:
        return min(self._waiting_read.values()) + after if self._waiting_read else None

    # -- readers ----------------------------------------------------------------------

    def get(self, event_id: str) -> Timeline | None:
        return self._lines.get(event_id)

    def __len__(self) -> int:
        return len(self._lines)

    def summary(self, event_id: str) -> dict[str, Any] | None:
        """``{"reached", "read_by"}`` for the status page, or None when not tracked."""
        line = self._lines.get(event_id)
        if line is None:
            return None
        return {"reached": line.reached, "read_by": line.read_by}

    def public(self, event_id: str) -> dict[str, Any] | None:
        """The timeline as plain data for ``GET /api/alarms/<id>``; numbers masked."""
        line = self._lines.get(event_id)
        if line is None:
            return None
        return {
            "id": line.id,
            "empresa": line.empresa,
            "sede": line.sede,
            "tipo": line.tipo,
            "tipo_alarma": line.tipo_alarma,
            "descripcion": line.descripcion,
            "received_at": _rfc(line.received_at),
            "backend": {
                "accepted": line.backend_accepted,
                "status": line.backend_status or None,
                "at": _rfc(line.backend_at),
            },
            "recipients": [
                {
                    "number": mask_phone(r.number),
                    "status": r.status or "pending",
                    "sent_at": _rfc(r.sent_at),
                    "delivered_at": _rfc(r.delivered_at),
                    "read_at": _rfc(r.read_at),
                    "failed_at": _rfc(r.failed_at),
                    "reason": r.reason,
                }
                for r in line.recipients
            ],
            "reached": line.reached,
            "read_by": line.read_by,
            "ack": (
                {
                    "by": mask_phone(line.acked_by) if line.acked_by else "",
                    "at": _rfc(line.acked_at),
                }
                if line.acked_at is not None
                else None
            ),
            "escalations": [
                {"at": _rfc(e.at), "kind": e.kind, "step": e.step, "to": e.to}
                for e in line.escalations
            ],
        }


def _apply(r: Recipient, receipt: Receipt, now: float) -> None:
    status = receipt.status
    if status == "failed":
        if r.read_at is None:
            r.status, r.failed_at, r.reason = "failed", now, receipt.reason[:MAX_REASON]
        return
    if status not in _RANK:
        return
    # Receipts can arrive out of order (read before delivered): read implies the rest.
    for step in STATUSES[: STATUSES.index(status) + 1]:
        attr = {"sent": "sent_at", "delivered": "delivered_at", "read": "read_at"}[step]
        if getattr(r, attr) is None:
            setattr(r, attr, now)
    if _RANK[status] > _RANK.get(r.status, 0) or r.status == "failed":
        r.status = status


def _rfc(seconds: float | None) -> str | None:
    return now_rfc3339(int(seconds * 1e9)) if seconds is not None else None
