"""Receipts and timelines, webhook parsing and signatures, WAHA acks, unread and digest
escalations, and the bounded alarm board. No sockets; time under ``autojump_clock``."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from botonera_bridge.config import from_mapping, masked
from botonera_bridge.inbound.commands import CommandContext, escalate, escalation_loop
from botonera_bridge.inbound.webhook import Webhook, parse_body, signature_ok
from botonera_bridge.inbound.ws_receiver import Inbound, parse_event
from botonera_bridge.intake.topics import decode_mqtt
from botonera_bridge.messages import Event
from botonera_bridge.metrics import Metrics
from botonera_bridge.queues.state import HashStore
from botonera_bridge.status.model import empresas_view
from botonera_bridge.watch import alarms
from botonera_bridge.watch.alarms import UNCONFIGURED, AlarmBook
from botonera_bridge.watch.receipts import MAX_RECIPIENTS, Receipt, Timelines

SAMPLES = Path("/work/shared/samples")
A = "+573001112233"
B = "+573004445566"
CENTRAL = "+573101234567"
CENTRAL2 = "+573101234568"
AFTER = 300.0
UNREAD = 120.0
SECRET = "app-secret-for-tests"  # noqa: S105 - a test value

SETTINGS = from_mapping(
    {
        "central": [CENTRAL, CENTRAL2],
        "escalation": {"after": AFTER, "max": 3, "unread_after": UNREAD},
        "empresas": [{"id": "cota", "contactos": [A, B]}],
    }
)


def alarm(empresa: str = "cota", n: int = 1, **fields: object) -> Event:
    obj = {"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "descripcion": f"Fallo {n}"}
    obj |= {"id": n} | fields
    return decode_mqtt(
        json.dumps(obj).encode(), f"empresas/{empresa}/principal", time.time_ns(), 65536
    )[1]


@dataclass
class Fake:
    sent: list[tuple[list[str], str, float]] = field(default_factory=list)

    async def send(self, numbers: Sequence[str], text: str) -> None:
        self.sent.append((list(numbers), text, trio.current_time()))

    async def publish(self, topic: str, payload: bytes) -> None:
        raise AssertionError("no publish expected")

    async def emit(self, event: Event) -> None:
        pass


def make(clock: object = None) -> tuple[CommandContext, Fake, Timelines]:
    fake = Fake()
    clk = clock or trio.current_time
    store = HashStore("botonera:alarms", None)
    book = AlarmBook(
        store,
        escalation_after=AFTER,
        escalation_max=3,
        clock=clk,  # type: ignore[arg-type]
        configured=lambda e: SETTINGS.empresa(e) is not None,
    )
    timelines = Timelines(store, clock=clk)  # type: ignore[arg-type]
    ctx = CommandContext(
        settings=SETTINGS,
        book=book,
        devices=list,
        send=fake.send,
        publish=fake.publish,
        emit=fake.emit,
        clock=clk,  # type: ignore[arg-type]
        timelines=timelines,
    )
    return ctx, fake, timelines


def open_and_send(ctx: CommandContext, tl: Timelines, n: int = 1, empresa: str = "cota") -> str:
    opened = ctx.book.observe(alarm(empresa, n))
    assert opened is not None
    tl.track(opened)
    for number in (A, B):
        tl.sent(number, f"wamid.{n}.{number[-4:]}", [opened.id])
    return opened.id


# ---------------------------------------------------------------- timelines


async def test_timeline_records_everything_and_masks_numbers() -> None:
    ctx, _, tl = make()
    event_id = open_and_send(ctx, tl)
    tl.backend_result(event_id, 201, True)
    # read arrives before delivered (receipts come out of order): read implies delivered
    assert tl.receipt(Receipt(message_id="wamid.1.2233", status="read"))
    assert tl.receipt(Receipt(message_id="wamid.1.2233", status="delivered"))
    tl.failed(B, [event_id], "131047 Re-engagement message")
    tl.acknowledged(event_id, B, trio.current_time())
    tl.escalated([event_id], "recordatorio", to=2, step=1)
    assert not tl.receipt(Receipt(message_id="wamid.unknown", status="read"))
    assert tl.unmatched == 1

    data = tl.public(event_id)
    assert data is not None
    assert data["backend"]["accepted"] is True
    assert data["backend"]["status"] == 201
    by_number = {r["number"]: r for r in data["recipients"]}
    a, b = by_number["+57******2233"], by_number["+57******5566"]
    assert a["status"] == "read"
    assert a["delivered_at"] is not None
    assert a["read_at"] is not None
    assert b["status"] == "failed"
    assert b["reason"].startswith("131047")
    assert data["reached"] == 2
    assert data["read_by"] == 1
    assert data["ack"]["by"] == "+57******5566"
    assert data["escalations"][0]["kind"] == "recordatorio"
    assert data["escalations"][0]["step"] == 1
    assert set(data) == {
        "id", "empresa", "sede", "tipo", "tipo_alarma", "descripcion",  # the panel's own fields
        "received_at", "backend", "recipients", "reached", "read_by", "ack", "escalations",
    }  # fmt: skip
    assert set(a) == {
        "number", "status", "sent_at", "delivered_at", "read_at", "failed_at", "reason"
    }
    text = json.dumps(data)
    assert A[1:] not in text
    assert B[1:] not in text
    assert tl.summary(event_id) == {"reached": 2, "read_by": 1}


async def test_timelines_persist_and_are_bounded() -> None:
    store = HashStore("botonera:alarms", None)
    book = AlarmBook(store, escalation_after=AFTER, escalation_max=3, clock=trio.current_time)
    tl = Timelines(store, clock=trio.current_time, max_timelines=10)
    ids = []
    for n in range(25):
        opened = book.observe(alarm("cota", n))
        tl.track(opened)
        assert opened is not None
        tl.sent(A, f"wamid.{n}", [opened.id])
        ids.append(opened.id)
    assert len(tl) == 10
    assert tl.get(ids[0]) is None  # oldest forgotten first
    assert tl.get(ids[-1]) is not None
    assert not tl.receipt(Receipt(message_id="wamid.0", status="read"))  # index pruned too
    line = tl.get(ids[-1])
    assert line is not None
    for k in range(MAX_RECIPIENTS + 10):
        tl.sent(f"+5730099{k:05d}", None, [ids[-1]])
    assert len(line.recipients) == MAX_RECIPIENTS
    # a restart rebuilds the same timelines (and the message-id index) from the hash
    assert tl.sync() == 10
    again = Timelines(store, clock=trio.current_time, max_timelines=10)
    assert len(again) == 10
    assert again.receipt(Receipt(message_id="wamid.24", status="read"))
    assert again.summary(ids[-1]) == {"reached": MAX_RECIPIENTS, "read_by": 1}


async def test_acknowledged_timeline_forgotten_after_24h(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ctx, _, tl = make()
    event_id = open_and_send(ctx, tl)
    tl.acknowledged(event_id, A, trio.current_time())
    await trio.sleep(24 * 3600 - 1)
    tl.track(ctx.book.observe(alarm("cota", 2)))  # any write runs the (minutely) sweep
    assert tl.get(event_id) is not None
    await trio.sleep(120)
    tl.track(ctx.book.observe(alarm("cota", 3)))
    assert tl.get(event_id) is None


# ---------------------------------------------------------------- receipts from outside


def test_waha_acks_become_receipts() -> None:
    lines = (SAMPLES / "waha-acks.jsonl").read_text().splitlines()
    got = [parse_event(line) for line in lines]
    assert got == [
        Receipt(
            message_id="true_573001112233@c.us_3EB0C7A1B2C3D4E5F6",
            status="delivered",
            number=A,
            timestamp=1764600002,
        ),
        Receipt(
            message_id="true_573001112233@c.us_3EB0C7A1B2C3D4E5F6",
            status="read",
            number=A,
            timestamp=1764600031,
        ),
    ]
    server = parse_event('{"event":"message.ack","payload":{"id":"x1","ack":1,"ackName":"SERVER"}}')
    assert isinstance(server, Receipt)
    assert server.status == "sent"
    assert parse_event('{"event":"message.ack","payload":{"id":"x1","ackName":"PENDING"}}') is None
    # messages still parse as before
    msg = parse_event((SAMPLES / "waha-events.jsonl").read_text().splitlines()[0])
    assert isinstance(msg, Inbound)


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_cloud_webhook_samples_parse() -> None:
    lines = (SAMPLES / "cloud-webhooks.jsonl").read_text().splitlines()
    items = [item for line in lines for item in parse_body(line.encode())]
    assert items[0] == Inbound(
        id="wamid.HBgMNTczMDAxMTEyMjMzFQIAEhggQTVBMzFDMjE0RDg2",
        sender=A,
        body="ACK",
        timestamp=1764600000,
    )
    statuses = [(r.status, r.number) for r in items[1:] if isinstance(r, Receipt)]
    assert statuses == [
        ("sent", A),
        ("delivered", A),
        ("read", A),
        ("failed", "+573001112244"),
    ]
    failed = items[-1]
    assert isinstance(failed, Receipt)
    assert failed.reason == "131047 Re-engagement message"


def test_webhook_items_are_checked_one_by_one() -> None:
    metrics = Metrics()
    value = {
        "messages": [
            {"from": "573001112233", "id": "w1", "timestamp": "1e300", "text": {"body": "x"}},
            {"from": "573001112233", "id": "w2", "timestamp": "99999999999999999999999"},
            {"from": "juan", "id": "w3", "timestamp": "1", "text": {"body": "x"}},
            "not an object",
            {"from": "573001112233", "id": "w4", "timestamp": "1700000000", "text": {"body": 5}},
            {"from": "573001112233", "id": "w5", "timestamp": "1700000000", "text": {"body": "ok"}},
        ],
        "statuses": [{"id": "s1", "status": "exploded"}, {"id": {}, "status": "read"}],
    }
    body = json.dumps({"entry": [{"changes": [{"field": "messages", "value": value}]}]})
    items = parse_body(body.encode(), metrics)
    assert [i.id for i in items if isinstance(i, Inbound)] == ["w5"]
    assert sum(s.value for s in _samples(metrics, "webhook")) == 7


def _samples(metrics: Metrics, source: str) -> list[object]:
    out = []
    for family in metrics.registry.collect():
        if family.name == "botonera_rejected":
            out += [
                s
                for s in family.samples
                if s.name.endswith("_total") and s.labels["source"] == source
            ]
    return out


async def test_webhook_signature_and_verification() -> None:
    hook = Webhook(app_secret=SECRET, verify_token="verify-me", metrics=Metrics())  # noqa: S106
    ok = {"hub.mode": ["subscribe"], "hub.verify_token": ["verify-me"], "hub.challenge": ["42"]}
    assert hook.verify(ok) == (200, b"42")
    assert hook.verify(ok | {"hub.verify_token": ["nope"]})[0] == 403
    body = (SAMPLES / "cloud-webhooks.jsonl").read_text().splitlines()[0].encode()
    assert not signature_ok(SECRET.encode(), body, None)
    assert not signature_ok(SECRET.encode(), body, sign(body, "other"))
    assert signature_ok(SECRET.encode(), body, sign(body))
    assert hook.post(body, sign(body, "other"))[0] == 403
    assert hook.post(body, None)[0] == 403
    assert hook.post(body, sign(body)) == (200, b"ok\n")
    got: list[Inbound] = []

    async def on_message(msg: Inbound) -> None:
        got.append(msg)

    async def on_receipt(r: Receipt) -> None:
        raise AssertionError("no receipt in this body")

    with trio.move_on_after(0.2):
        await hook.run(on_message, on_receipt)
    assert [m.body for m in got] == ["ACK"]  # once: the refused posts queued nothing
    no_secret = Webhook(app_secret="", verify_token="")
    assert no_secret.post(body, sign(body, ""))[0] == 403
    assert no_secret.verify(ok | {"hub.verify_token": [""]})[0] == 403


async def test_webhook_queue_full_answers_503() -> None:
    hook = Webhook(app_secret=SECRET, verify_token="", queue=1)
    body = (SAMPLES / "cloud-webhooks.jsonl").read_text().splitlines()[0].encode()
    assert hook.post(body, sign(body))[0] == 200
    assert hook.post(body, sign(body))[0] == 503  # Meta retries later; nothing dropped silently


# ---------------------------------------------------------------- unread escalation


async def run_loop_until(ctx: CommandContext, end: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(escalation_loop, ctx)
        await trio.sleep_until(end)
        nursery.cancel_scope.cancel()


async def test_unread_alarm_goes_to_central_exactly_at_unread_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ctx, fake, tl = make()
    t0 = trio.current_time()
    event_id = open_and_send(ctx, tl)
    with trio.fail_after(AFTER):
        await run_loop_until(ctx, t0 + AFTER - 1)
    unread = [(n, t, at - t0) for n, t, at in fake.sent if "SIN LEER" in t]
    assert len(unread) == 1
    numbers, text, at = unread[0]
    assert at == pytest.approx(UNREAD)
    assert numbers == [CENTRAL, CENTRAL2]
    assert "ALARMA CRITICA — Cota (sede principal): Fallo 1" in text
    assert "2 min" in text
    line = tl.get(event_id)
    assert line is not None
    assert [e.kind for e in line.escalations] == ["sin_leer"]
    assert len(fake.sent) == 1  # nothing else before the regular reminder


async def test_a_read_receipt_prevents_the_unread_escalation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ctx, fake, tl = make()
    t0 = trio.current_time()
    open_and_send(ctx, tl)
    async with trio.open_nursery() as nursery:
        await nursery.start(escalation_loop, ctx)
        await trio.sleep_until(t0 + UNREAD - 1)
        tl.receipt(Receipt(message_id="wamid.1.5566", status="read"))
        await trio.sleep_until(t0 + AFTER - 1)
        nursery.cancel_scope.cancel()
    assert fake.sent == []


async def test_no_unread_escalation_without_receipts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ctx, fake, tl = make()
    t0 = trio.current_time()
    opened = ctx.book.observe(alarm())
    tl.track(opened)
    assert opened is not None
    tl.sent(A, None, [opened.id])  # provider "log": no message id, so no receipts
    await run_loop_until(ctx, t0 + AFTER - 1)
    assert fake.sent == []


async def test_many_unread_alarms_are_one_digest(autojump_clock: trio.testing.MockClock) -> None:
    ctx, fake, tl = make()
    t0 = trio.current_time()
    for n in range(30):
        open_and_send(ctx, tl, n)
    await run_loop_until(ctx, t0 + UNREAD + 1)
    assert len(fake.sent) == 1
    numbers, text, at = fake.sent[0]
    assert numbers == [CENTRAL, CENTRAL2]
    assert at - t0 == pytest.approx(UNREAD)
    assert text.startswith("👀 SIN LEER — 30 alarmas")
    assert "y 20 más" in text
    assert len(text) <= 4096


# ---------------------------------------------------------------- flood bounds


async def test_many_unconfigured_empresas_share_one_bucket_and_one_digest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ctx, fake, _ = make()
    t0 = trio.current_time()
    for n in range(3000):
        ctx.book.observe(alarm(f"nueva{n}", n))
        await trio.sleep(0.01)
    assert len(ctx.book._alarms) <= alarms.MAX_PER_EMPRESA  # noqa: SLF001 - the bound itself
    assert ctx.book.bucket("nueva7") == UNCONFIGURED
    assert ctx.book.open_alarms("cota") == []
    view = empresas_view(SETTINGS, lambda empresas: [], ctx.book, None)
    block = view[-1]
    assert block["id"] == UNCONFIGURED
    assert len(block["alarms"]) <= 50
    assert block["alarms"][0]["empresa"] == "nueva2999"  # newest first
    await trio.sleep_until(t0 + 30 + AFTER)
    escalated = await escalate(ctx, trio.current_time())
    assert escalated > 100
    assert len(fake.sent) == 1  # one digest toward central for the whole round
    numbers, text, _ = fake.sent[0]
    assert numbers == [CENTRAL, CENTRAL2]
    assert text.startswith(f"⚠️ SIN ATENDER — {escalated} alarmas")
    assert len(text) <= 4096


async def test_the_whole_board_has_a_cap() -> None:
    settings = from_mapping({"empresas": [{"id": f"e{i}"} for i in range(20)]})
    book = AlarmBook(
        HashStore("k", None),
        escalation_after=AFTER,
        escalation_max=3,
        clock=trio.current_time,
        configured=lambda e: settings.empresa(e) is not None,
        max_alarms=500,
    )
    for n in range(20 * 150):
        book.observe(alarm(f"e{n % 20}", n))
    assert len(book._alarms) <= 500  # noqa: SLF001 - the bound itself
    assert all(len(book.open_alarms(f"e{i}")) > 0 for i in range(20))


def test_webhook_config_keys_env_file_and_masking(tmp_path: Path) -> None:
    secret_file = tmp_path / "app-secret"
    secret_file.write_text("from-a-file\n")
    s = from_mapping(
        {"whatsapp": {"app_secret_file": str(secret_file)}},
        env={"WHATSAPP_VERIFY_TOKEN": "vt-from-env"},
    )
    assert s.whatsapp.app_secret == "from-a-file"  # noqa: S105 - test values
    assert s.whatsapp.verify_token == "vt-from-env"  # noqa: S105 - test values
    assert s.escalation.unread_after == 120.0
    env = from_mapping({}, env={"WHATSAPP_APP_SECRET": "from-env"})
    assert env.whatsapp.app_secret == "from-env"  # noqa: S105 - test values
    shown = json.dumps(masked(s))
    assert "from-a-file" not in shown
    assert "vt-from-env" not in shown
    assert masked(s)["whatsapp"]["app_secret"] == "****"  # noqa: S105 - test values


@pytest.mark.parametrize(
    ("timestamp", "reason"),
    [
        (1e300, "invalid_schema"),
        (18446744073709551616000, "invalid_schema"),
        (2**63, "invalid_schema"),
        (-1, "invalid_schema"),
        ("1741249702", "missing_field"),
        (float("nan"), "invalid_json"),  # json.dumps writes NaN: not JSON
    ],
)
def test_numeric_fields_are_range_checked_at_decode(timestamp: object, reason: str) -> None:
    from botonera_bridge.errors import InvalidMessage

    frame = {
        "event": "message",
        "payload": {"id": "x1", "from": "573001112233@c.us", "body": "ESTADO"},
    }
    frame["payload"]["timestamp"] = timestamp  # type: ignore[index]
    with pytest.raises(InvalidMessage) as caught:
        parse_event(json.dumps(frame))
    assert caught.value.reason == reason
    huge_id = json.dumps({"id": 10**400, "from": "+573001112233", "body": "x", "timestamp": 1})
    with pytest.raises(InvalidMessage, match="out of range"):
        parse_event(huge_id)
    ok = parse_event(json.dumps(frame | {"payload": frame["payload"] | {"timestamp": 2**63 - 1}}))
    assert isinstance(ok, Inbound)
