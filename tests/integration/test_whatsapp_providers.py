"""Cloud API and WAHA providers over real HTTP against the fake server (real clock, no autojump)."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import pytest
import trio
from tests.servers.whatsapp_api import FakeWhatsApp
from tests.support.procs import free_port

from botonera_bridge.config import Settings, from_mapping
from botonera_bridge.errors import TransientDelivery
from botonera_bridge.messages import Event
from botonera_bridge.sinks.whatsapp import WhatsAppSink
from botonera_bridge.sinks.whatsapp_api import Sender, WhatsAppRejected, open_sender

NUMBER = "+573001112233"
DIGITS = "573001112233"
TOKEN = "s3cr3t-token-value"  # noqa: S105 - fake token for the fake server


@pytest.fixture
def wa_server() -> Iterator[FakeWhatsApp]:
    server = FakeWhatsApp()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(autouse=True)
def _no_clear_numbers_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    assert DIGITS not in caplog.text
    assert TOKEN not in caplog.text


class Entry(NamedTuple):
    id: str
    event: Event


class MemoryDelivery:
    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[Entry](math.inf)
        self.n = 0
        self.acked: list[tuple[str, str]] = []
        self.dead: list[tuple[str, str, str]] = []
        self.changed = trio.Event()

    def put(self, event: Event) -> Entry:
        self.n += 1
        entry = Entry(f"m-{self.n}", event)
        self._send.send_nowait(entry)
        return entry

    async def read(self, count: int) -> list[Entry]:
        out = [await self._recv.receive()]
        while len(out) < count:
            try:
                out.append(self._recv.receive_nowait())
            except trio.WouldBlock:
                break
        return out

    async def ack(self, entries: Any, outcome: str = "ok") -> None:
        self.acked.extend((e.id, outcome) for e in entries)
        self.changed.set()

    async def dead_letter(self, entry: Entry, reason: str, detail: str) -> None:
        self.dead.append((entry.id, reason, detail))
        self.changed.set()

    async def wait_done(self, n: int) -> None:
        while len(self.acked) + len(self.dead) < n:
            self.changed = trio.Event()
            await self.changed.wait()

    def close(self) -> None:
        self._send.close()
        self._recv.close()


def make_settings(server: FakeWhatsApp, contactos: dict[str, list[str]], **wa: Any) -> Settings:
    return from_mapping(
        {
            "empresas": [{"id": k, "contactos": v} for k, v in contactos.items()],
            "whatsapp": {
                "provider": "cloud",
                "api_url": server.url,
                "phone_number_id": "109876543210",
                "token": TOKEN,
                "timeout": 2.0,
            }
            | wa,
        }
    )


def alarm(empresa: str = "cota", desc: str = "Fallo en sistema", **kw: Any) -> Event:
    fields: dict[str, Any] = {
        "id": f"ev-{empresa}-{desc}",
        "tipo": "alarmas",
        "empresa": empresa,
        "sede": "principal",
        "dispositivo": "",
        "topic": f"empresas/{empresa}",
        "recibido_en": "",
        "origen": "mqtt",
        "payload": b"{}",
        "detail": {"tipo_alarma": "CRITICA", "descripcion": desc},
    }
    fields.update(kw)
    return Event(**fields)


@asynccontextmanager
async def running(s: Settings) -> AsyncIterator[tuple[WhatsAppSink, MemoryDelivery]]:
    delivery = MemoryDelivery()
    try:
        async with open_sender(s.whatsapp) as sender, trio.open_nursery() as nursery:
            sink = WhatsAppSink(s, sender)
            await nursery.start(sink.run, delivery)
            yield sink, delivery
            nursery.cancel_scope.cancel()
    finally:
        delivery.close()


async def test_cloud_text_arrives_within_a_second(wa_server):
    s = make_settings(wa_server, {"cota": [NUMBER]})
    async with running(s) as (_, delivery):
        start = trio.current_time()
        delivery.put(alarm())
        with trio.fail_after(5):
            await delivery.wait_done(1)
        assert trio.current_time() - start < 1.0
    assert delivery.acked == [("m-1", "ok")]
    (req,) = wa_server.requests()
    assert req.path == "/v21.0/109876543210/messages"
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.headers["user-agent"].startswith("botonera-bridge/")
    assert req.headers["content-type"] == "application/json"
    assert req.json == {
        "messaging_product": "whatsapp",
        "to": DIGITS,
        "type": "text",
        "text": {"body": req.json["text"]["body"]},
    }
    assert req.json["text"]["body"].startswith(
        "🚨 ALARMA CRITICA — Cota (sede principal): Fallo en sistema · "
    )


async def test_cloud_template_when_configured(wa_server):
    s = make_settings(wa_server, {"cota": [NUMBER]}, template="alerta_botonera", language="es_CO")
    async with running(s) as (sink, delivery):
        delivery.put(alarm())
        with trio.fail_after(5):
            await delivery.wait_done(1)
        await sink.post(["+573004445566"], "Comandos: AYUDA, ESTADO")
        with trio.fail_after(10):  # replies are plain text even with a template
            while len(wa_server.requests()) < 2:  # noqa: ASYNC110 - a server in a thread
                await trio.sleep(0.05)
    template, reply = wa_server.requests()
    body = template.json
    assert body["type"] == "template"
    assert body["to"] == DIGITS
    assert body["template"]["name"] == "alerta_botonera"
    assert body["template"]["language"] == {"code": "es_CO"}
    (component,) = body["template"]["components"]
    assert component["type"] == "body"
    params = [p["text"] for p in component["parameters"]]
    assert all(p["type"] == "text" for p in component["parameters"])
    assert params[:2] == ["Cota (sede principal)", "ALARMA CRITICA"]
    assert params[2].startswith("Fallo en sistema · ")
    assert reply.json["type"] == "text"


async def test_rate_limit_errors_are_retried_within_max_per_second(wa_server):
    wa_server.set(error_every=(3, 130429))
    numbers = [f"+5730010000{i:02d}" for i in range(10)]
    s = make_settings(wa_server, {f"e{i}": [n] for i, n in enumerate(numbers)}, max_per_second=5)
    async with running(s) as (_, delivery):
        for i in range(10):
            delivery.put(alarm(empresa=f"e{i}"))
        with trio.fail_after(20):
            await delivery.wait_done(10)
    assert sorted(delivery.acked) == sorted((f"m-{i}", "ok") for i in range(1, 11))
    assert delivery.dead == []
    reqs = wa_server.requests()
    ok = sorted(r.json["to"] for r in reqs if r.status == 200)
    assert ok == sorted(n[1:] for n in numbers)
    assert any(r.status == 429 for r in reqs)
    arrivals = sorted(r.at for r in reqs)
    for t in arrivals:  # 50 ms of slack for network jitter between client and server
        assert sum(1 for u in arrivals if t <= u < t + 0.95) <= 5


async def test_permanent_131047_is_dead_lettered_not_retried(wa_server):
    wa_server.set(fail_number=(DIGITS, 131047))
    s = make_settings(wa_server, {"cota": [NUMBER]})
    async with running(s) as (_, delivery):
        delivery.put(alarm())
        with trio.fail_after(5):
            await delivery.wait_done(1)
        await trio.sleep(1.0)
    assert len(wa_server.requests()) == 1
    assert delivery.acked == []
    (dead,) = delivery.dead
    assert dead[:2] == ("m-1", "whatsapp_131047")
    assert "+57******2233" in dead[2]
    assert DIGITS not in dead[2]


async def test_waha_send_text_shape_and_api_key(wa_server):
    s = from_mapping(
        {
            "empresas": [{"id": "cota", "contactos": [NUMBER]}],
            "whatsapp": {
                "provider": "waha",
                "api_url": wa_server.url + "/",
                "session": "botonera",
                "token": TOKEN,
            },
        }
    )
    wa_server.set(down=True)
    async with running(s) as (_, delivery):
        delivery.put(alarm(prueba=True))
        with trio.move_on_after(1.0):  # the first attempt goes after the 0.3 s gather
            await delivery.wait_done(1)
        assert delivery.acked == []  # 500s are retried
        wa_server.set(down=False)
        with trio.fail_after(10):
            await delivery.wait_done(1)
    reqs = wa_server.requests()
    assert len(reqs) >= 2
    assert {r.status for r in reqs[:-1]} == {500}
    last = reqs[-1]
    assert (last.path, last.status) == ("/api/sendText", 201)
    assert last.headers["x-api-key"] == TOKEN
    assert "authorization" not in last.headers
    assert last.json["session"] == "botonera"
    assert last.json["chatId"] == f"{DIGITS}@c.us"
    assert last.json["text"].startswith("[PRUEBA] 🚨 ALARMA CRITICA — Cota")


@asynccontextmanager
async def cloud(server_url: str, **wa: Any) -> AsyncIterator[Sender]:
    settings = from_mapping(
        {
            "whatsapp": {
                "provider": "cloud",
                "api_url": server_url,
                "phone_number_id": "1",
                "token": TOKEN,
            }
            | wa
        }
    )
    async with open_sender(settings.whatsapp) as sender:
        yield sender


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (130429, True),
        (131056, True),
        (131057, True),
        (131000, True),
        (131016, True),
        (131047, False),
        (131026, False),
        (131051, False),
        (100, False),
        (190, False),
        (999999, False),  # unknown code on a 400
    ],
)
async def test_graph_error_classification(wa_server, code, transient):
    wa_server.set(error_every=(1, code), retry_after="7")
    async with cloud(wa_server.url) as sender:
        if transient:
            with pytest.raises(TransientDelivery) as info:
                await sender.send_text(NUMBER, "x")
            assert info.value.retry_after == 7.0
        else:
            with pytest.raises(WhatsAppRejected) as rej:
                await sender.send_text(NUMBER, "x")
            assert rej.value.code == str(code)
            assert str(code) in str(rej.value)
            assert DIGITS not in str(rej.value)
            assert "+57******2233" in str(rej.value)


async def test_connection_errors_and_timeouts_are_transient(wa_server):
    async with cloud(f"http://127.0.0.1:{free_port()}") as sender:
        with pytest.raises(TransientDelivery, match="unreachable"):
            await sender.send_text(NUMBER, "x")
    wa_server.set(delay=0.6)
    async with cloud(wa_server.url, timeout=0.2) as sender:
        with pytest.raises(TransientDelivery, match="timeout"):
            await sender.send_text(NUMBER, "x")
    wa_server.set(delay=0.0, down=True)
    async with cloud(wa_server.url) as sender:
        with pytest.raises(TransientDelivery) as info:
            await sender.send_text(NUMBER, "x")
        assert info.value.status == 500


async def test_sink_reports_provider_message_ids_to_its_observer(wa_server):
    """Cloud answers messages[0].id, WAHA id._serialized: both reach the observer."""
    seen: list[tuple[str, str | None, list[str]]] = []
    failed: list[tuple[str, list[str], str]] = []

    class Observer:
        def sent(self, number: str, message_id: str | None, event_ids: Any) -> None:
            seen.append((number, message_id, list(event_ids)))

        def failed(self, number: str, event_ids: Any, reason: str) -> None:
            failed.append((number, list(event_ids), reason))

    s = make_settings(wa_server, {"cota": [NUMBER]})
    async with open_sender(s.whatsapp) as sender, trio.open_nursery() as nursery:
        delivery = MemoryDelivery()
        sink = WhatsAppSink(s, sender, observer=Observer())
        await nursery.start(sink.run, delivery)
        delivery.put(alarm(desc="uno"))
        with trio.fail_after(5):
            await delivery.wait_done(1)
        nursery.cancel_scope.cancel()
    delivery.close()
    ((number, mid, ids),) = seen
    assert number == NUMBER
    assert mid is not None
    assert mid.startswith("wamid.")
    assert ids == ["ev-cota-uno"]
    assert failed == []
    waha = from_mapping(
        {"whatsapp": {"provider": "waha", "api_url": wa_server.url, "token": TOKEN}}
    )
    async with open_sender(waha.whatsapp) as sender:
        waha_id = await sender.send_text(NUMBER, "x")
    assert waha_id is not None
    assert waha_id.startswith(f"true_{DIGITS}@c.us_")
