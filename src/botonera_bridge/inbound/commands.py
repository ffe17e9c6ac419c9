"""WhatsApp commands from the empresas' contacts, and escalation of unattended alarms.

:func:`handle` runs one inbound message (the inbox workers call it, in order per
sender). Only numbers listed in an empresa's ``contactos`` may command it; anything
else is ignored without a reply, logged with the number masked, and counted.
Commands are case- and accent-insensitive and the first word decides:

- ``AYUDA`` — the command list;
- ``ESTADO`` — per empresa: panels online/offline with last seen, semáforo, open alarms;
- ``ACK`` / ``RECIBIDO`` / ``ATENDIDO`` [id] — acknowledge the newest open alarm
  (or the one whose id starts with ``id``), tell the other contacts, post an
  ``acuse`` to the backend;
- ``SEMAFORO <COLOR>`` [empresa] — publish a ``semaforos`` command to ``comandos/<empresa>``.

:func:`escalation_loop` re-sends unacknowledged alarms to the empresa's contacts
and the ``central`` contacts (:meth:`AlarmBook.due` decides when); the alarms due
in one round go to each number as one digest. Where delivery receipts exist, an
alarm no contact has read within ``escalation.unread_after`` goes to ``central``
at once (:func:`escalate_unread`), many at once as one digest.

Replies are Spanish; logs are English and never show a full phone number.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgspec
import trio

from ..config import Empresa, Settings
from ..errors import BridgeError, DeliveryError
from ..ids import fold, mask_phone, message_ref, stable_id
from ..intake.topics import COMMAND_TOPIC
from ..messages import Event, now_rfc3339, synthetic
from ..metrics import Metrics
from ..sinks import texts
from ..sinks.texts import SEMAFOROS, clock_time, empresa_name, escalation_prefix, semaforo
from ..watch.alarms import AlarmBook, OpenAlarm, colour_of
from ..watch.receipts import Timelines
from .ws_receiver import Inbound

log = logging.getLogger(__name__)

ACUSE_TOPIC: Final = "whatsapp/acuse"
PUBLISH_TIMEOUT: Final = 10.0  # seconds a person waits for a SEMAFORO confirmation
SEND_WAIT: Final = 30.0  # seconds to wait on one WhatsApp send before moving on
ACK_SKEW: Final = 10.0  # seconds of clock difference tolerated between WhatsApp and us
STALE_COMMAND: Final = 600.0  # seconds after which a SEMAFORO command is not applied
MAX_TICK: Final = 1.0  # seconds; the escalation loop looks at least this often
MAX_PANEL_LINES: Final = 15  # panels listed per empresa in ESTADO (offline first)
SHORT_ID: Final = 8  # characters of an event id shown to people
DIGEST_LINES: Final = 10  # alarms listed in one escalation digest, then "y N más"
DIGEST_LINE_CHARS: Final = 240  # characters per digest line
LOG_EACH_UP_TO: Final = 5  # escalated alarms logged one by one; more get one line

HELP_WORDS: Final = frozenset({"ayuda", "help", "comandos", "menu"})
STATUS_WORDS: Final = frozenset({"estado", "status"})
ACK_WORDS: Final = frozenset({"ack", "recibido", "recibida", "atendido", "atendida"})
SEMAFORO_WORDS: Final = frozenset({"semaforo", "semaforos"})

_TOKEN: Final = re.compile(r"[a-z0-9_-]+")
_REF: Final = re.compile(r"^(?=.*[0-9])[0-9a-f-]{4,36}$")  # an event id or its prefix

AYUDA: Final = (
    "🤖 Comandos disponibles:\n"
    "• ESTADO — paneles, semáforo y alarmas abiertas\n"
    "• ACK (o RECIBIDO / ATENDIDO) — marcar como atendida la alarma más reciente; "
    "ACK <código> para una en particular\n"
    "• SEMAFORO <COLOR> — cambiar el semáforo "
    "(VERDE, AMARILLO, NARANJA, ROJO, AZUL)\n"
    "• AYUDA — este mensaje"
)
HINT: Final = "No entendí el mensaje. Escriba AYUDA para ver los comandos."
NOTHING_OPEN: Final = "No hay alarmas abiertas."
COLOURS: Final = tuple(SEMAFOROS)


class DeviceLike(Protocol):
    """A panel as the watchdog reports it (``watchdog.DeviceState`` fits)."""

    @property
    def key(self) -> str: ...
    @property
    def empresa(self) -> str: ...
    @property
    def sede(self) -> str: ...
    @property
    def dispositivo(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def last_seen(self) -> float: ...  # wall seconds


@dataclass(kw_only=True)  # not frozen: a reload (SIGHUP) swaps ``settings``
class CommandContext:
    """What commands and escalations may touch; built once in ``app.run``."""

    settings: Settings
    book: AlarmBook
    devices: Callable[[], Sequence[DeviceLike]]
    send: Callable[[Sequence[str], str], Awaitable[None]]  # WhatsApp text to E.164 numbers
    publish: Callable[[str, bytes], Awaitable[None]]  # MQTT QoS 1 publish
    emit: Callable[[Event], Awaitable[None]]  # durable outbox append (→ backend)
    clock: Callable[[], float] = field(default=time.time)  # wall seconds, for "visto hace"
    metrics: Metrics | None = None  # botonera_escalations_total
    timelines: Timelines | None = None  # receipts and timelines, when kept


# ---------------------------------------------------------------- incoming messages


async def handle(ctx: CommandContext, msg: Inbound, *, metrics: Metrics | None = None) -> None:
    """Run one inbound WhatsApp message. Never raises for a person's mistake."""
    who = mask_phone(msg.sender)
    empresas = [e.id for e in ctx.settings.empresas if msg.sender in e.contactos]
    if not empresas:
        log.info("ignoring WhatsApp message %s from %s: not a contact", message_ref(msg.id), who)
        if metrics is not None:
            metrics.ignored.labels(reason="unauthorized").inc()
        return
    words = _TOKEN.findall(fold(msg.body))
    command = words[0] if words else ""
    args = words[1:]
    if command in HELP_WORDS:
        kind = "ayuda"
        await _reply(ctx, msg.sender, AYUDA)
    elif command in STATUS_WORDS:
        kind = "estado"
        await _reply(ctx, msg.sender, status_text(ctx, empresas))
    elif command in ACK_WORDS:
        kind = "ack"
        await _acknowledge(ctx, msg, empresas, args)
    elif command in SEMAFORO_WORDS:
        kind = "semaforo"
        await _semaforo(ctx, msg, empresas, args)
    else:
        kind = "unknown"
        await _reply(ctx, msg.sender, HINT)
    log.info("WhatsApp command %s from %s (message %s)", kind, who, message_ref(msg.id))


async def _reply(ctx: CommandContext, to: str, text: str) -> None:
    await _send(ctx, [to], text)


async def _send(ctx: CommandContext, numbers: Sequence[str], text: str) -> None:
    """Best effort: a failed WhatsApp send is logged, never re-runs the command.

    Waits at most :data:`SEND_WAIT`: the sender keeps a message it could not send
    yet (rate limits, an API outage) and sends it later, so a slow WhatsApp never
    holds up the next command or the next escalation.
    """
    if not numbers:
        return
    masked = ", ".join(mask_phone(n) for n in numbers)
    with trio.move_on_after(SEND_WAIT) as scope:
        try:
            await ctx.send(list(numbers), text)
        except DeliveryError as exc:
            log.warning("WhatsApp text to %s failed: %s", masked, exc)
    if scope.cancelled_caught:
        log.info("WhatsApp text to %s still queued after %.0fs", masked, SEND_WAIT)


# ---------------------------------------------------------------- ESTADO


def status_text(ctx: CommandContext, empresas: Sequence[str]) -> str:
    """The ESTADO reply: one block per empresa, in one message."""
    now = ctx.clock()
    devices = list(ctx.devices())
    blocks = [_empresa_status(ctx, e, devices, now) for e in empresas]
    return "\n\n".join(blocks)


def _empresa_status(
    ctx: CommandContext, empresa: str, devices: Sequence[DeviceLike], now: float
) -> str:
    lines = [f"📋 *{_label(ctx, empresa)}*"]
    sem = ctx.book.semaforo(empresa)
    if sem is None:
        lines.append("🚦 Semáforo: sin datos")
    else:
        emoji, colour, meaning = semaforo(sem[0])
        label = f" ({meaning})" if meaning else ""
        lines.append(f"🚦 Semáforo: {emoji} {colour}{label} desde {clock_time(int(sem[1] * 1e9))}")
    mine = [d for d in devices if d.empresa == empresa]
    if not mine:
        lines.append("📟 Paneles: ninguno ha reportado")
    else:
        online = sum(1 for d in mine if d.state == "online")
        lines.append(f"📟 Paneles: {online} en línea, {len(mine) - online} sin conexión")
        mine.sort(key=lambda d: (d.state == "online", d.key))  # offline first
        for d in mine[:MAX_PANEL_LINES]:
            icon, state = ("🟢", "en línea") if d.state == "online" else ("🔴", "sin conexión")
            if d.state not in ("online", "offline"):
                icon, state = "⚪", d.state
            lines.append(f"  {icon} {_panel(d)} — {state}, {seen_ago(now, d.last_seen)}")
        if len(mine) > MAX_PANEL_LINES:
            lines.append(f"  … y {len(mine) - MAX_PANEL_LINES} paneles más")
    opened = ctx.book.open_alarms(empresa)
    if not opened:
        lines.append("✅ Sin alarmas abiertas")
    else:
        newest = opened[0]
        lines.append(
            f"🚨 Alarmas abiertas: {len(opened)} — la más reciente: {alarm_label(ctx, newest)}"
            f" [código {short_id(newest.id)}]"
        )
    return "\n".join(lines)


def seen_ago(now: float, last_seen: float) -> str:
    """'visto hace 12 s', 'visto hace 3 min', 'visto hace 2 h', 'visto hace 4 días'."""
    if last_seen <= 0:
        return "nunca visto"
    ago = max(0.0, now - last_seen)
    if ago < 60:
        return f"visto hace {int(ago)} s"
    if ago < 3600:
        return f"visto hace {int(ago // 60)} min"
    if ago < 86400:
        return f"visto hace {int(ago // 3600)} h"
    days = int(ago // 86400)
    return f"visto hace {days} día" + ("" if days == 1 else "s")


def _panel(d: DeviceLike) -> str:
    parts = [p for p in (d.sede, d.dispositivo) if p]
    return "/".join(parts) if parts else "panel sin nombre"


def _label(ctx: CommandContext, empresa: str) -> str:
    return empresa_name(empresa, _empresa(ctx, empresa))


def short_id(event_id: str) -> str:
    return event_id[:SHORT_ID]


def alarm_label(ctx: CommandContext, alarm: OpenAlarm) -> str:
    """'CRITICA — Cota (sede principal): Fallo en sistema · 14:32' (texts.alarm_label)."""
    return texts.alarm_label(alarm, _empresa(ctx, alarm.empresa))


def _empresa(ctx: CommandContext, empresa: str) -> Empresa | None:
    return ctx.settings.empresa(empresa) if empresa else None


# ---------------------------------------------------------------- ACK


async def _acknowledge(
    ctx: CommandContext, msg: Inbound, empresas: Sequence[str], args: Sequence[str]
) -> None:
    book = ctx.book
    ref = next((a for a in args if _REF.match(a)), None)
    if ref is not None:
        found = [a for a in (book.find(e, ref) for e in empresas) if a is not None]
        if not found:
            await _reply(
                ctx,
                msg.sender,
                f"No encuentro la alarma «{ref}». Escriba ESTADO para ver las alarmas abiertas.",
            )
            return
        target = found[0]
        if target.acked:
            por = mask_phone(target.acked_by) if target.acked_by else "otra persona"
            label = alarm_label(ctx, target)
            await _reply(ctx, msg.sender, f"ℹ️ La alarma {label} ya fue atendida por {por}.")
            return
    else:
        opened = [a for e in empresas for a in book.open_alarms(e)]
        if not opened:
            await _reply(ctx, msg.sender, NOTHING_OPEN)
            return
        # The newest alarm that existed when the person wrote: an alarm that opened
        # while the ACK was on its way is not the one they meant.
        known = [a for a in opened if not msg.timestamp or a.opened_at <= msg.timestamp + ACK_SKEW]
        if not known:
            await _reply(
                ctx,
                msg.sender,
                f"No había alarmas abiertas cuando escribió. Hay {len(opened)} nueva(s): "
                "escriba ESTADO para verlas y ACK para atender la más reciente.",
            )
            return
        target = max(known, key=lambda a: (a.opened_at, a.received_ns, a.id))

    acked = book.acknowledge(target.empresa, msg.sender, target.id)
    if acked is None:  # cannot happen without a concurrent ACK; say so plainly
        await _reply(ctx, msg.sender, NOTHING_OPEN)
        return
    now_ns = int(ctx.clock() * 1e9)
    await ctx.emit(
        synthetic(
            {
                "tipo_mensaje": "acuse",
                "empresa": acked.empresa,
                "sede": acked.sede,
                "alarma_id": acked.id,
                "por": msg.sender,
                "timestamp": now_rfc3339(now_ns),
            },
            origen="whatsapp",
            topic=ACUSE_TOPIC,
            received_ns=now_ns,
            empresa=acked.empresa,
            sede=acked.sede,
            event_id=stable_id("whatsapp", "acuse", acked.id),
            detail={"alarma_id": acked.id, "por": mask_phone(msg.sender)},
        )
    )
    if ctx.timelines is not None:
        ctx.timelines.acknowledged(acked.id, msg.sender, acked.acked_at or ctx.book.clock())
    log.info(
        "alarm %s of %s acknowledged by %s", acked.id, acked.empresa or "-", mask_phone(msg.sender)
    )
    label = alarm_label(ctx, acked)
    await _reply(ctx, msg.sender, f"✅ Alarma {label} marcada como atendida.")
    others = [n for n in _contacts(ctx, acked.empresa) if n != msg.sender]
    if acked.escalations > 0:  # central heard about it: tell them it is handled
        others += [n for n in ctx.settings.central if n != msg.sender and n not in others]
    await _send(ctx, others, f"✅ Alarma {label} atendida por {mask_phone(msg.sender)}.")


def _contacts(ctx: CommandContext, empresa: str) -> list[str]:
    e = ctx.settings.empresa(empresa) if empresa else None
    return list(e.contactos) if e is not None else []


# ---------------------------------------------------------------- SEMAFORO


async def _semaforo(
    ctx: CommandContext, msg: Inbound, empresas: Sequence[str], args: Sequence[str]
) -> None:
    if msg.timestamp and ctx.clock() - msg.timestamp > STALE_COMMAND:
        log.warning(
            "not publishing a semaforo from %s: the message is %.0fs old",
            mask_phone(msg.sender),
            ctx.clock() - msg.timestamp,
        )
        await _reply(
            ctx,
            msg.sender,
            "⚠️ Su mensaje llegó con retraso y no se aplicó. Envíelo de nuevo si aún aplica.",
        )
        return
    valid = ", ".join(COLOURS[:-1]) + f" o {COLOURS[-1]}"
    colour = colour_of(args[0]) if args else ""
    if colour not in SEMAFOROS:
        shown = f"«{args[0]}» no es un color válido. " if args else ""
        await _reply(ctx, msg.sender, f"{shown}Colores: {valid}. Ejemplo: SEMAFORO ROJO")
        return
    if len(empresas) == 1:
        empresa = empresas[0]
    else:
        names = {fold(_label(ctx, e)): e for e in empresas} | {e: e for e in empresas}
        wanted = " ".join(args[1:])
        chosen = names.get(wanted.replace(" ", "_")) or names.get(wanted)
        if chosen is None:
            labels = ", ".join(_label(ctx, e) for e in empresas)
            await _reply(
                ctx,
                msg.sender,
                f"Usted está en varias empresas ({labels}). "
                f"Escriba SEMAFORO {colour} <empresa>, por ejemplo SEMAFORO {colour} {empresas[0]}",
            )
            return
        empresa = chosen
    payload = msgspec.json.encode(
        {
            "tipo_mensaje": "semaforos",
            "tipo_alarma": colour,
            "empresa": empresa,
            "origen": "whatsapp",
            "por": mask_phone(msg.sender),  # panels and their logs need no full number
            # the WhatsApp message id, masked like the number (WAHA ids embed it)
            "ref": message_ref(msg.id),
        }
    )
    topic = COMMAND_TOPIC.format(empresa=empresa)
    emoji, _, meaning = semaforo(colour)
    published = False
    with trio.move_on_after(PUBLISH_TIMEOUT):
        try:
            await ctx.publish(topic, payload)
            published = True
        except (BridgeError, OSError) as exc:
            log.warning("cannot publish %s command to %s: %s", colour, topic, exc)
    if not published:
        await _reply(
            ctx,
            msg.sender,
            f"⚠️ No se pudo enviar el semáforo a {_label(ctx, empresa)}: "
            "sin conexión con el broker. Intente de nuevo.",
        )
        return
    log.info("semaforo %s sent to %s by %s", colour, topic, mask_phone(msg.sender))
    label = f" ({meaning})" if meaning else ""
    await _reply(
        ctx, msg.sender, f"🚦 Semáforo {emoji} {colour}{label} enviado a {_label(ctx, empresa)}."
    )


# ---------------------------------------------------------------- escalation


async def escalate(ctx: CommandContext, now: float) -> int:
    """Send the reminders that fell due at ``now``; returns how many alarms were escalated.

    Each empresa's contacts get one message for that empresa's due alarms, and each
    ``central`` number one message for all the due alarms it is not a contact of:
    a digest when there are several, so a flood of alarms is one message per round.
    """
    due = ctx.book.due(now)
    total = ctx.book.max
    if not due:
        return 0
    by_empresa: dict[str, list[OpenAlarm]] = {}
    for alarm in due:
        by_empresa.setdefault(alarm.empresa, []).append(alarm)
    _log_escalations(ctx, due, total)
    messages = {"contacts": 0, "central": 0}
    if ctx.metrics is not None:
        ctx.metrics.escalations.inc(len(due))
    async with trio.open_nursery() as nursery:  # one slow number must not delay the others
        for empresa, alarms in by_empresa.items():
            contacts = _contacts(ctx, empresa)
            if not contacts:
                continue
            if len(alarms) == 1:
                alarm = alarms[0]
                text = (
                    f"{escalation_prefix(alarm.escalations, total)} {_alarm_headline(ctx, alarm)}"
                )
                text += f"\nResponda ACK {short_id(alarm.id)} para marcarla como atendida."
            else:
                text = _digest(ctx, f"⚠️ SIN ATENDER — {len(alarms)} alarmas", alarms, total)
                text += "\nResponda ACK <código> para marcar una como atendida."
            _record(ctx, alarms, "recordatorio", len(contacts))
            messages["contacts"] += len(contacts)
            nursery.start_soon(_send, ctx, contacts, text)
        groups: dict[tuple[OpenAlarm, ...], list[str]] = {}
        for number in ctx.settings.central:
            mine = tuple(a for a in due if number not in _contacts(ctx, a.empresa))
            if mine:
                groups.setdefault(mine, []).append(number)
        for alarms_t, numbers in groups.items():
            if len(alarms_t) == 1:
                alarm = alarms_t[0]
                text = (
                    f"{escalation_prefix(alarm.escalations, total)} {_alarm_headline(ctx, alarm)}"
                )
            else:
                text = _digest(ctx, f"⚠️ SIN ATENDER — {len(alarms_t)} alarmas", alarms_t, total)
            _record(ctx, alarms_t, "recordatorio", len(numbers))
            messages["central"] += len(numbers)
            nursery.start_soon(_send, ctx, numbers, text)
    log.info(
        "escalation round: %d alarms unattended; %d messages to contacts, %d to %d central numbers",
        len(due),
        messages["contacts"],
        messages["central"],
        len(ctx.settings.central),
    )
    return len(due)


def _log_escalations(ctx: CommandContext, due: Sequence[OpenAlarm], total: int) -> None:
    central = len(ctx.settings.central)
    if len(due) > LOG_EACH_UP_TO:
        log.warning("%d alarms unattended: reminders sent as digests", len(due))
        return
    for alarm in due:
        contacts = _contacts(ctx, alarm.empresa)
        log.warning(
            "alarm %s of %s unattended: reminder %d/%d to %d contacts and %d central",
            alarm.id,
            alarm.empresa or "-",
            alarm.escalations,
            total,
            len(contacts),
            len([n for n in ctx.settings.central if n not in contacts]),
        )
        if not contacts and not central:
            log.warning("alarm %s has nobody to remind: no contactos nor central", alarm.id)


def _record(ctx: CommandContext, alarms: Sequence[OpenAlarm], kind: str, to: int) -> None:
    if ctx.timelines is None:
        return
    for alarm in alarms:
        ctx.timelines.escalated([alarm.id], kind, to=to, step=alarm.escalations)


def _digest(ctx: CommandContext, title: str, alarms: Sequence[OpenAlarm], total: int | None) -> str:
    """'⚠️ SIN ATENDER — 12 alarmas' and up to DIGEST_LINES lines, then 'y N más'."""
    lines = [title]
    for alarm in alarms[:DIGEST_LINES]:
        step = f"(aviso {alarm.escalations}/{total}) " if total else ""
        line = f"• {step}{alarm_label(ctx, alarm)} [código {short_id(alarm.id)}]"
        if len(line) > DIGEST_LINE_CHARS:
            line = line[: DIGEST_LINE_CHARS - 1] + "…"
        lines.append(line)
    if len(alarms) > DIGEST_LINES:
        lines.append(f"y {len(alarms) - DIGEST_LINES} más")
    return "\n".join(lines)


async def escalate_unread(ctx: CommandContext, now: float) -> int:
    """Send to ``central`` the alarms that no recipient has read within
    ``escalation.unread_after`` (only alarms whose messages carry receipts);
    returns how many alarms were escalated."""
    tl = ctx.timelines
    after = ctx.settings.escalation.unread_after
    if tl is None or after <= 0:
        return 0
    due: list[OpenAlarm] = []
    for line in tl.unread_due(now, after):
        alarm = ctx.book.get(line.id)
        if alarm is None or alarm.acked:
            tl.unwatch(line.id)
            continue
        due.append(alarm)
    if not due:
        return 0
    minutes = f"{after / 60:g} min" if after >= 60 else f"{after:g} s"
    groups: dict[tuple[OpenAlarm, ...], list[str]] = {}
    for number in ctx.settings.central:
        mine = tuple(a for a in due if (t := tl.get(a.id)) is None or t.recipient(number) is None)
        if mine:
            groups.setdefault(mine, []).append(number)
    if not ctx.settings.central:
        log.warning("%d alarms unread after %s and no central contacts to tell", len(due), minutes)
    async with trio.open_nursery() as nursery:
        for alarms_t, numbers in groups.items():
            if len(alarms_t) == 1:
                text = (
                    f"👀 SIN LEER — ningún contacto la ha leído en {minutes}: "
                    f"{_alarm_headline(ctx, alarms_t[0])}"
                )
            else:
                text = _digest(
                    ctx,
                    f"👀 SIN LEER — {len(alarms_t)} alarmas que ningún contacto ha leído "
                    f"en {minutes}",
                    alarms_t,
                    None,
                )
            nursery.start_soon(_send, ctx, numbers, text)
    reached = {n for numbers in groups.values() for n in numbers}
    for alarm in due:
        tl.escalated([alarm.id], "sin_leer", to=len(reached))
    log.warning(
        "%d alarms unread by every contact after %s: sent to %d central numbers",
        len(due),
        minutes,
        len(reached),
    )
    return len(due)


def _alarm_headline(ctx: CommandContext, alarm: OpenAlarm) -> str:
    return texts.alarm_headline(alarm, _empresa(ctx, alarm.empresa))


async def escalation_loop(
    ctx: CommandContext,
    *,
    clock: Callable[[], float] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Escalate forever: wake at the next due time, and at least every :data:`MAX_TICK`.

    ``clock`` defaults to the book's clock (they must agree). The book writes itself
    through to Redis (:meth:`AlarmBook.run`).
    """
    now_fn = clock or ctx.book.clock
    task_status.started()
    while True:
        await escalate(ctx, now_fn())
        await escalate_unread(ctx, now_fn())
        times = [ctx.book.next_due()]
        if ctx.timelines is not None and ctx.settings.escalation.unread_after > 0:
            times.append(ctx.timelines.next_unread_due(ctx.settings.escalation.unread_after))
        next_due = min((t for t in times if t is not None), default=None)
        delay = MAX_TICK if next_due is None else min(MAX_TICK, next_due - now_fn())
        await trio.sleep(max(0.0, delay))
