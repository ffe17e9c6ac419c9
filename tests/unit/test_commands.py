"""WhatsApp commands and escalation, with a recording fake context (no sockets)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import pytest
import trio
import trio.testing

from botonera_bridge.config import from_mapping
from botonera_bridge.errors import MqttError, TransientDelivery
from botonera_bridge.ids import message_ref
from botonera_bridge.inbound import commands
from botonera_bridge.inbound.commands import CommandContext, escalate, escalation_loop, handle
from botonera_bridge.inbound.ws_receiver import Inbound
from botonera_bridge.intake.topics import decode_mqtt
from botonera_bridge.messages import Event
from botonera_bridge.metrics import Metrics
from botonera_bridge.queues.state import HashStore
from botonera_bridge.sinks.backend import wire_body
from botonera_bridge.watch.alarms import AlarmBook

A = "+573001112233"  # cota and funza
B = "+573004445566"  # cota
C = "+573007778899"  # funza
CENTRAL = "+573101234567"
STRANGER = "+573009998877"
AFTER = 300.0

SETTINGS = from_mapping(
    {
        "central": [CENTRAL],
        "escalation": {"after": AFTER, "max": 3},
        "empresas": [
            {"id": "cota", "contactos": [A, B]},
            {"id": "funza", "contactos": [A, C]},
        ],
    }
)


@dataclass(frozen=True)
class Device:
    key: str
    empresa: str
    sede: str
    dispositivo: str
    state: str
    last_seen: float


@dataclass
class Fake:
    """Records what the commands did; ``clock`` drives the book and 'visto hace'."""

    now: float = 1_741_249_700.0
    sent: list[tuple[list[str], str, float]] = field(default_factory=list)
    published: list[tuple[str, bytes]] = field(default_factory=list)
    emitted: list[Event] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    publish_error: Exception | None = None
    send_error: Exception | None = None

    def clock(self) -> float:
        return self.now

    async def send(self, numbers: Sequence[str], text: str) -> None:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append((list(numbers), text, trio.current_time()))

    async def publish(self, topic: str, payload: bytes) -> None:
        if self.publish_error is not None:
            raise self.publish_error
        self.published.append((topic, payload))

    async def emit(self, event: Event) -> None:
        self.emitted.append(event)

    def to(self, number: str) -> list[str]:
        return [text for numbers, text, _ in self.sent if number in numbers]


def make(fake: Fake | None = None, *, clock: object = None) -> tuple[CommandContext, Fake]:
    fake = fake or Fake()
    clk = clock or fake.clock
    book = AlarmBook(
        HashStore("botonera:alarms", None),
        escalation_after=AFTER,
        escalation_max=3,
        clock=clk,  # type: ignore[arg-type]
    )
    ctx = CommandContext(
        settings=SETTINGS,
        book=book,
        devices=lambda: fake.devices,
        send=fake.send,
        publish=fake.publish,
        emit=fake.emit,
        clock=fake.clock,
    )
    return ctx, fake


def alarm(empresa: str = "cota", n: int = 1, **fields: object) -> Event:
    obj = {
        "tipo_mensaje": "alarmas",
        "tipo_alarma": "CRITICA",
        "descripcion": "Fallo en sistema",
        "id": n,
    } | fields
    topic = f"empresas/{empresa}/principal"
    return decode_mqtt(json.dumps(obj).encode(), topic, time.time_ns(), 65536)[1]


def inbound(sender: str, body: str, n: int = 1, timestamp: int = 1_741_249_700) -> Inbound:
    wa_id = f"false_{sender[1:]}@c.us_{n:04d}"  # WAHA ids embed the number
    return Inbound(id=wa_id, sender=sender, body=body, timestamp=timestamp)


# ---------------------------------------------------------------- authorization


async def test_strangers_get_no_reply_and_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    ctx, fake = make()
    metrics = Metrics()
    ctx.book.observe(alarm())
    caplog.set_level(logging.INFO, logger="botonera_bridge.inbound.commands")
    for body in ("ESTADO", "ACK", "semaforo rojo", "hola"):
        await handle(ctx, inbound(STRANGER, body), metrics=metrics)
    assert fake.sent == []
    assert fake.published == []
    assert fake.emitted == []
    assert len(ctx.book.open_alarms("cota")) == 1
    assert metrics.ignored.labels(reason="unauthorized")._value.get() == 4
    assert STRANGER[1:] not in caplog.text  # neither as a number nor inside a message id
    assert "+57******8877" in caplog.text


async def test_logs_never_show_a_full_number(caplog: pytest.LogCaptureFixture) -> None:
    ctx, _ = make()
    ctx.book.observe(alarm())
    caplog.set_level(logging.DEBUG)
    for body in ("ESTADO", "ACK", "semaforo rojo", "hola", "AYUDA"):
        await handle(ctx, inbound(B, body))
    await escalate(ctx, 1e12)
    assert caplog.text
    assert B[1:] not in caplog.text
    assert A[1:] not in caplog.text


async def test_central_alone_may_not_command() -> None:
    ctx, fake = make()
    await handle(ctx, inbound(CENTRAL, "ESTADO"))
    assert fake.sent == []


# ---------------------------------------------------------------- AYUDA and others


@pytest.mark.parametrize("body", ["AYUDA", "ayuda", "Ayúda", "  AYUDA por favor", "¿ayuda?"])
async def test_help(body: str) -> None:
    ctx, fake = make()
    await handle(ctx, inbound(B, body))
    assert fake.to(B) == [commands.AYUDA]
    assert "ESTADO" in commands.AYUDA
    assert "SEMAFORO" in commands.AYUDA


@pytest.mark.parametrize("body", ["hola", "", "👍", "gracias!"])
async def test_anything_else_gets_a_hint(body: str) -> None:
    ctx, fake = make()
    await handle(ctx, inbound(B, body))
    assert fake.to(B) == [commands.HINT]
    assert "AYUDA" in commands.HINT


async def test_a_failed_reply_does_not_raise() -> None:
    ctx, fake = make()
    fake.send_error = TransientDelivery("boom", sink="whatsapp")
    await handle(ctx, inbound(B, "AYUDA"))


# ---------------------------------------------------------------- ESTADO


async def test_estado_one_reply_listing_panels() -> None:
    ctx, fake = make()
    fake.devices = [
        Device("cota/principal/boton1", "cota", "principal", "boton1", "online", fake.now - 12),
        Device("cota/norte/boton2", "cota", "norte", "boton2", "offline", fake.now - 185),
        Device("funza/-/boton9", "funza", "", "boton9", "online", fake.now - 3),
    ]
    ctx.book.observe(alarm(n=1))
    ctx.book.observe(alarm(n=2, descripcion="Puerta forzada"))
    ctx.book.observe(
        decode_mqtt(
            b'{"tipo_mensaje":"semaforos","tipo_alarma":"naranja"}',
            "empresas/cota",
            time.time_ns(),
            65536,
        )[1]
    )
    await handle(ctx, inbound(B, "estado"))
    assert len(fake.sent) == 1
    numbers, text, _ = fake.sent[0]
    assert numbers == [B]
    assert "Cota" in text
    assert "Funza" not in text  # B is only in cota
    assert "principal/boton1 — en línea, visto hace 12 s" in text
    assert "norte/boton2 — sin conexión, visto hace 3 min" in text
    assert text.index("norte/boton2") < text.index("principal/boton1")  # offline first
    assert "1 en línea, 1 sin conexión" in text
    assert "NARANJA (alerta)" in text
    assert "Alarmas abiertas: 2" in text
    assert "Puerta forzada" in text  # the newest


async def test_estado_for_a_number_in_two_empresas() -> None:
    ctx, fake = make()
    fake.devices = [Device("funza/-/b", "funza", "", "b", "offline", 0)]
    await handle(ctx, inbound(A, "ESTADO"))
    assert len(fake.sent) == 1
    text = fake.sent[0][1]
    assert "*Cota*" in text
    assert "*Funza*" in text
    assert "Paneles: ninguno ha reportado" in text  # cota
    assert "b — sin conexión, nunca visto" in text  # funza
    assert "Semáforo: sin datos" in text
    assert "Sin alarmas abiertas" in text


def test_seen_ago() -> None:
    assert commands.seen_ago(1000, 1000 - 59) == "visto hace 59 s"
    assert commands.seen_ago(1000, 1000 - 180) == "visto hace 3 min"
    assert commands.seen_ago(10_000, 10_000 - 7200) == "visto hace 2 h"
    assert commands.seen_ago(400_000, 400_000 - 86_400) == "visto hace 1 día"
    assert commands.seen_ago(400_000, 400_000 - 3 * 86_400) == "visto hace 3 días"
    assert commands.seen_ago(1000, 0) == "nunca visto"


# ---------------------------------------------------------------- ACK


@pytest.mark.parametrize("body", ["ACK", "ack", "Recibido", "RECIBIDO, voy en camino", "atendido"])
async def test_ack_flow(body: str) -> None:
    ctx, fake = make()
    opened = ctx.book.observe(alarm())
    assert opened is not None
    await handle(ctx, inbound(B, body))

    mine = fake.to(B)
    assert len(mine) == 1
    assert mine[0].startswith("✅ Alarma CRITICA — Cota (sede principal): Fallo en sistema")
    assert mine[0].endswith("marcada como atendida.")
    others = [(n, t) for n, t, _ in fake.sent if B not in n]
    assert len(others) == 1
    assert others[0][0] == [A]  # the other contact of cota, not central (no reminder yet)
    assert "atendida por +57******5566" in others[0][1]
    assert B not in others[0][1]

    assert len(fake.emitted) == 1
    acuse = fake.emitted[0]
    assert (acuse.tipo, acuse.origen, acuse.topic) == ("acuse", "whatsapp", "whatsapp/acuse")
    assert (acuse.empresa, acuse.sede) == ("cota", "principal")
    body_obj = json.loads(acuse.payload)
    assert body_obj["tipo_mensaje"] == "acuse"
    assert body_obj["alarma_id"] == opened.id
    assert body_obj["por"] == B
    assert body_obj["empresa"] == "cota"
    assert body_obj["sede"] == "principal"
    assert body_obj["timestamp"].endswith("Z")
    assert json.loads(wire_body(acuse))["_bridge"]["origen"] == "whatsapp"

    assert ctx.book.open_alarms("cota") == []
    assert ctx.book.next_due() is None  # reminders stopped
    assert await escalate(ctx, fake.now + 10 * AFTER) == 0


async def test_ack_with_nothing_open() -> None:
    ctx, fake = make()
    await handle(ctx, inbound(B, "ACK"))
    assert fake.to(B) == ["No hay alarmas abiertas."]
    assert fake.emitted == []


async def test_ack_acts_on_the_newest_across_empresas() -> None:
    ctx, fake = make()
    ctx.book.observe(alarm("cota", 1))
    fake.now += 10
    newer = ctx.book.observe(alarm("funza", 2))
    assert newer is not None
    await handle(ctx, inbound(A, "ack"))
    assert json.loads(fake.emitted[0].payload)["alarma_id"] == newer.id
    assert [n for n, _, _ in fake.sent] == [[A], [C]]  # funza's other contact is C
    assert len(ctx.book.open_alarms("cota")) == 1


async def test_ack_a_given_alarm_by_its_code() -> None:
    ctx, fake = make()
    older = ctx.book.observe(alarm(n=1))
    fake.now += 1
    ctx.book.observe(alarm(n=2))
    assert older is not None
    await handle(ctx, inbound(B, f"ACK {older.id[:8]}"))
    assert json.loads(fake.emitted[0].payload)["alarma_id"] == older.id
    await handle(ctx, inbound(A, f"ack {older.id[:8]}", 2))
    assert "ya fue atendida por +57******5566" in fake.to(A)[-1]
    await handle(ctx, inbound(A, "ack 0000ffff", 3))
    assert "No encuentro la alarma «0000ffff»" in fake.to(A)[-1]
    assert len(fake.emitted) == 1


async def test_ack_ignores_an_alarm_that_opened_after_the_message_was_written() -> None:
    ctx, fake = make()
    meant = ctx.book.observe(alarm(n=1))
    assert meant is not None
    written_at = int(fake.now) + 5
    fake.now += 60  # the ACK waited in the queue while a new alarm opened
    ctx.book.observe(alarm(n=2, descripcion="Otra cosa"))
    await handle(ctx, inbound(B, "ACK", timestamp=written_at))
    assert json.loads(fake.emitted[0].payload)["alarma_id"] == meant.id
    assert len(ctx.book.open_alarms("cota")) == 1
    # an ACK written before any open alarm existed acknowledges nothing
    await handle(ctx, inbound(B, "ACK", 2, timestamp=written_at))
    assert "No había alarmas abiertas cuando escribió. Hay 1 nueva(s)" in fake.to(B)[-1]
    assert len(fake.emitted) == 1


async def test_ack_after_a_reminder_tells_central_too() -> None:
    ctx, fake = make()
    ctx.book.observe(alarm())
    await escalate(ctx, fake.now + AFTER)
    fake.sent.clear()
    await handle(ctx, inbound(B, "ACK"))
    told = [n for n, t, _ in fake.sent if "atendida por" in t]
    assert told == [[A, CENTRAL]]


async def test_acuse_id_is_stable_per_alarm() -> None:
    ctx1, fake1 = make()
    ctx2, fake2 = make()
    for ctx in (ctx1, ctx2):
        ctx.book.observe(alarm())
        await handle(ctx, inbound(B, "ACK"))
    assert fake1.emitted[0].id == fake2.emitted[0].id


# ---------------------------------------------------------------- SEMAFORO


@pytest.mark.parametrize(
    "body", ["SEMAFORO ROJO", "Semáforo rojo", "semaforo ROJO", "SEMÁFORO Rojo!"]
)
async def test_semaforo_publishes_to_the_empresa(body: str) -> None:
    ctx, fake = make()
    msg = inbound(B, body)
    await handle(ctx, msg)
    assert len(fake.published) == 1
    topic, payload = fake.published[0]
    assert topic == "comandos/cota"
    assert msgspec.json.decode(payload) == {
        "tipo_mensaje": "semaforos",
        "tipo_alarma": "ROJO",
        "empresa": "cota",
        "origen": "whatsapp",
        "por": "+57******5566",  # masked: the full number never leaves the bridge to panels
        "ref": message_ref(msg.id),
    }
    assert B[1:] not in payload.decode()
    assert fake.to(B) == ["🚦 Semáforo 🔴 ROJO (emergencia) enviado a Cota."]
    assert ctx.book.semaforo("cota") is None  # the panel reports the change itself


@pytest.mark.parametrize("body", ["SEMAFORO MORADO", "semaforo"])
async def test_semaforo_unknown_colour(body: str) -> None:
    ctx, fake = make()
    await handle(ctx, inbound(B, body))
    assert fake.published == []
    reply = fake.to(B)[0]
    assert "VERDE, AMARILLO, NARANJA, ROJO o AZUL" in reply


async def test_semaforo_for_a_number_in_two_empresas() -> None:
    ctx, fake = make()
    await handle(ctx, inbound(A, "semaforo azul"))
    assert fake.published == []
    assert "varias empresas (Cota, Funza)" in fake.to(A)[0]
    await handle(ctx, inbound(A, "semaforo azul Funza", 2))
    assert [t for t, _ in fake.published] == ["comandos/funza"]
    assert json.loads(fake.published[0][1])["tipo_alarma"] == "AZUL"


async def test_a_late_semaforo_command_is_not_applied() -> None:
    ctx, fake = make()
    late = int(fake.now - commands.STALE_COMMAND - 1)
    await handle(ctx, inbound(B, "semaforo rojo", timestamp=late))
    assert fake.published == []
    assert "llegó con retraso" in fake.to(B)[0]


async def test_semaforo_when_the_broker_is_down() -> None:
    ctx, fake = make()
    fake.publish_error = MqttError("not connected")
    await handle(ctx, inbound(B, "semaforo verde"))
    assert "No se pudo enviar el semáforo a Cota" in fake.to(B)[0]


async def test_semaforo_publish_that_hangs_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ctx, fake = make()

    async def stuck(topic: str, payload: bytes) -> None:
        await trio.sleep_forever()

    ctx = CommandContext(
        settings=ctx.settings,
        book=ctx.book,
        devices=ctx.devices,
        send=fake.send,
        publish=stuck,
        emit=fake.emit,
        clock=fake.clock,
    )
    start = trio.current_time()
    await handle(ctx, inbound(B, "semaforo verde"))
    assert trio.current_time() - start == pytest.approx(commands.PUBLISH_TIMEOUT)
    assert "No se pudo enviar" in fake.to(B)[0]


# ---------------------------------------------------------------- escalation


async def run_loop_until(ctx: CommandContext, end: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(escalation_loop, ctx)
        await trio.sleep_until(end)
        nursery.cancel_scope.cancel()


async def test_escalation_without_ack(autojump_clock: trio.testing.MockClock) -> None:
    fake = Fake()
    ctx, _ = make(fake, clock=trio.current_time)
    t0 = trio.current_time()
    opened = ctx.book.observe(alarm())
    assert opened is not None
    with trio.fail_after(11 * AFTER):
        await run_loop_until(ctx, t0 + 10 * AFTER)
    reminders = [(n, t, at - t0) for n, t, at in fake.sent]
    contact_times = [at for n, _, at in reminders if n == [A, B]]
    central_times = [at for n, _, at in reminders if n == [CENTRAL]]
    assert contact_times == [AFTER, 2 * AFTER, 3 * AFTER]
    assert central_times == [AFTER, 2 * AFTER, 3 * AFTER]
    texts = [t for n, t, _ in reminders if n == [A, B]]
    assert [t.split(" 🚨")[0] for t in texts] == [f"⚠️ SIN ATENDER (aviso {k}/3)" for k in (1, 2, 3)]
    assert "ALARMA CRITICA — Cota (sede principal): Fallo en sistema" in texts[0]
    assert f"Responda ACK {opened.id[:8]}" in texts[0]
    assert "Responda ACK" not in [t for n, t, _ in reminders if n == [CENTRAL]][0]


async def test_escalation_with_ack_before_after(autojump_clock: trio.testing.MockClock) -> None:
    fake = Fake()
    ctx, _ = make(fake, clock=trio.current_time)
    t0 = trio.current_time()
    ctx.book.observe(alarm())
    async with trio.open_nursery() as nursery:
        await nursery.start(escalation_loop, ctx)
        await trio.sleep_until(t0 + AFTER - 1)
        await handle(ctx, inbound(B, "ACK"))
        await trio.sleep_until(t0 + 10 * AFTER)
        nursery.cancel_scope.cancel()
    assert [t for _, t, _ in fake.sent if "SIN ATENDER" in t] == []
    assert len(fake.emitted) == 1


async def test_escalation_ack_after_the_first_reminder(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = Fake()
    ctx, _ = make(fake, clock=trio.current_time)
    t0 = trio.current_time()
    ctx.book.observe(alarm())
    async with trio.open_nursery() as nursery:
        await nursery.start(escalation_loop, ctx)
        await trio.sleep_until(t0 + 1.5 * AFTER)
        await handle(ctx, inbound(A, "recibido"))
        await trio.sleep_until(t0 + 10 * AFTER)
        nursery.cancel_scope.cancel()
    reminder_times = [at - t0 for n, t, at in fake.sent if "SIN ATENDER" in t and n == [A, B]]
    assert reminder_times == [AFTER]


async def test_escalation_of_a_semaforo_rojo_and_unknown_empresa(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = Fake()
    ctx, _ = make(fake, clock=trio.current_time)
    t0 = trio.current_time()
    ctx.book.observe(
        decode_mqtt(
            b'{"tipo_mensaje":"semaforos","tipo_alarma":"ROJO"}', "empresas/cota", 1, 65536
        )[1]
    )
    ctx.book.observe(alarm("bogota", 5))  # not configured: central only
    await trio.sleep_until(t0 + AFTER)
    assert await escalate(ctx, trio.current_time()) == 2
    texts = {tuple(n): t for n, t, _ in fake.sent}
    assert "🔴 SEMÁFORO ROJO — Cota" in texts[(A, B)]
    assert [n for n, t, _ in fake.sent if "bogota" in t] == [[CENTRAL]]


async def test_a_stuck_whatsapp_does_not_hold_escalations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = Fake()
    ctx, _ = make(fake, clock=trio.current_time)
    started: list[tuple[list[str], float]] = []

    async def stuck(numbers: Sequence[str], text: str) -> None:
        started.append((list(numbers), trio.current_time()))
        await trio.sleep_forever()  # e.g. the WhatsApp API is down: retried forever

    ctx = CommandContext(
        settings=ctx.settings,
        book=ctx.book,
        devices=ctx.devices,
        send=stuck,
        publish=fake.publish,
        emit=fake.emit,
        clock=fake.clock,
    )
    t0 = trio.current_time()
    ctx.book.observe(alarm("cota", 1))
    ctx.book.observe(alarm("funza", 2))
    await trio.sleep_until(t0 + AFTER)
    assert await escalate(ctx, trio.current_time()) == 2
    assert trio.current_time() - t0 == AFTER + commands.SEND_WAIT  # all sent side by side
    # central gets one digest for both alarms of the round (issue 9: summarised escalations)
    assert sorted(n for n, _ in started) == [[A, B], [A, C], [CENTRAL]]
    assert {at - t0 for _, at in started} == {AFTER}
