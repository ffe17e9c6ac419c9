"""WhatsAppSink under autojump_clock: exact virtual times for spacing, rate, coalescing, retries."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import trio

from botonera_bridge.config import Settings, from_mapping
from botonera_bridge.errors import TransientDelivery
from botonera_bridge.messages import Event
from botonera_bridge.metrics import Metrics
from botonera_bridge.sinks.whatsapp import GATHER_QUIET, WhatsAppSink
from botonera_bridge.sinks.whatsapp_api import WhatsAppRejected, WhatsAppThrottled

A = "+573001112233"
B = "+573004445566"
C = "+573007778899"
CENTRAL = "+573000000001"


class Entry(NamedTuple):
    id: str
    event: Event


class FakeDelivery:
    """In-memory Delivery recording acks and dead letters with their virtual times."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[Entry](math.inf)
        self.n = 0
        self.read_total = 0
        self.acked: list[tuple[str, str, float]] = []  # (entry id, outcome, time)
        self.dead: list[tuple[str, str, str, float]] = []  # (entry id, reason, detail, time)
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
        self.read_total += len(out)
        return out

    async def ack(self, entries: Any, outcome: str = "ok") -> None:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        self.acked.extend((e.id, outcome, now) for e in entries)
        self.changed.set()

    async def dead_letter(self, entry: Entry, reason: str, detail: str) -> None:
        await trio.lowlevel.checkpoint()
        self.dead.append((entry.id, reason, detail, trio.current_time()))
        self.changed.set()

    def done(self) -> int:
        return len(self.acked) + len(self.dead)

    def close(self) -> None:
        self._send.close()
        self._recv.close()


class Call(NamedTuple):
    at: float
    to: str
    text: str
    params: tuple[str, str, str] | None


class RecordingSender:
    """Records calls; ``script[number]`` lists exceptions to raise on that number's next calls."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.script: dict[str, list[Exception]] = {}
        self.always: dict[str, Callable[[], Exception]] = {}

    async def send_text(
        self, to: str, text: str, *, template_params: tuple[str, str, str] | None = None
    ) -> str | None:
        await trio.lowlevel.checkpoint()
        self.calls.append(Call(trio.current_time(), to, text, template_params))
        if to in self.always:
            raise self.always[to]()
        pending = self.script.get(to)
        if pending:
            raise pending.pop(0)
        return None

    def to(self, number: str) -> list[Call]:
        return [c for c in self.calls if c.to == number]


def settings(*, empresas: list[dict[str, Any]] | None = None, **wa: Any) -> Settings:
    return from_mapping(
        {
            "central": [CENTRAL],
            "empresas": empresas
            if empresas is not None
            else [{"id": "cota", "nombre": "Cota", "contactos": [A]}],
            "whatsapp": wa,
        }
    )


_seq = 0


def alarm(
    empresa: str = "cota", desc: str = "Fallo en sistema", tipo_alarma: str = "CRITICA", **kw: Any
) -> Event:
    global _seq
    _seq += 1
    fields: dict[str, Any] = {
        "id": f"ev-{_seq}",
        "tipo": "alarmas",
        "empresa": empresa,
        "sede": "principal",
        "dispositivo": "",
        "topic": f"empresas/{empresa}",
        "recibido_en": "",
        "origen": "mqtt",
        "payload": b"{}",
        "received_ns": 1_714_678_330 * 10**9,
        "detail": {"tipo_alarma": tipo_alarma, "descripcion": desc},
    }
    fields.update(kw)
    return Event(**fields)


class Told:
    """The sink's DeliveryObserver (its public path to the timelines): who was told what."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str]]] = []  # (number, event ids) per message
        self.failures: list[tuple[str, list[str], str]] = []

    def sent(self, number: str, message_id: str | None, event_ids: Sequence[str]) -> None:
        self.messages.append((number, list(event_ids)))

    def failed(self, number: str, event_ids: Sequence[str], reason: str) -> None:
        self.failures.append((number, list(event_ids), reason))


class Harness(NamedTuple):
    sink: WhatsAppSink
    delivery: FakeDelivery
    sender: RecordingSender
    t0: float
    told: Told
    metrics: Metrics


@asynccontextmanager
async def running(s: Settings, **kw: Any) -> AsyncIterator[Harness]:
    sender = RecordingSender()
    delivery = FakeDelivery()
    told = Told()
    metrics = Metrics()
    kw.setdefault("observer", told)
    sink = WhatsAppSink(s, sender, metrics=metrics, rng=random.Random(7), **kw)
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run, delivery)
            yield Harness(sink, delivery, sender, trio.current_time(), told, metrics)
            nursery.cancel_scope.cancel()
    delivery.close()


async def until_done(h: Harness, n: int) -> None:
    """Wait (on virtual time) until n entries were acked or dead-lettered."""
    while h.delivery.done() < n:
        h.delivery.changed = trio.Event()
        await h.delivery.changed.wait()
    assert h.delivery.done() == n


def rel(h: Harness, calls: list[Call]) -> list[float]:
    return [round(c.at - h.t0, 6) for c in calls]


async def test_six_seconds_between_messages_to_one_number(autojump_clock):
    async with running(settings()) as h:
        h.delivery.put(alarm(desc="uno"))
        await trio.sleep(1)
        h.delivery.put(alarm(desc="dos"))  # waits for the slot at 6.3
        await trio.sleep(7)
        h.delivery.put(alarm(desc="tres"))  # t=8: next slot 12.3
        await until_done(h, 3)
        assert rel(h, h.sender.calls) == [0.3, 6.3, 12.3]
        assert [c.text.split(": ")[1].split(" ·")[0] for c in h.sender.calls] == [
            "uno",
            "dos",
            "tres",
        ]
        assert [(a[1], round(a[2] - h.t0, 6)) for a in h.delivery.acked] == [
            ("ok", 0.3),
            ("ok", 6.3),
            ("ok", 12.3),
        ]
        assert h.metrics.delivered.labels(sink="whatsapp")._value.get() == 3


async def test_max_per_second_overall(autojump_clock):
    numbers = [f"+5730010000{i:02d}" for i in range(25)]
    empresas = [{"id": f"e{i}", "contactos": [n]} for i, n in enumerate(numbers)]
    async with running(settings(empresas=empresas, max_per_second=10)) as h:
        for i in range(25):
            h.delivery.put(alarm(empresa=f"e{i}"))
        await until_done(h, 25)
        times = rel(h, h.sender.calls)
        assert times == [0.3] * 10 + [1.3] * 10 + [2.3] * 5
        assert sorted(c.to for c in h.sender.calls) == sorted(numbers)


async def test_burst_of_identical_alarms_becomes_one_message(autojump_clock):
    async with running(settings()) as h:
        for _ in range(10):
            h.delivery.put(alarm())
            await trio.sleep(0.01)
        await until_done(h, 10)
        assert len(h.sender.calls) == 1
        call = h.sender.calls[0]
        assert call.at - h.t0 == pytest.approx(0.09 + GATHER_QUIET)  # quiet after the last
        assert "(×10 en 1 min)" in call.text
        assert call.text.startswith("🚨 ALARMA CRITICA — Cota (sede principal): Fallo en sistema")
        assert {a[1] for a in h.delivery.acked} == {"ok"}
        assert [len(ids) for _, ids in h.told.messages] == [10]  # every event the message carried
        await trio.sleep(120)  # the window ends with nothing to summarize
        assert len(h.sender.calls) == 1


async def test_merge_while_queued_then_summary_after_window(autojump_clock):
    async with running(settings(dedup_window=60)) as h:
        h.delivery.put(alarm(desc="otra"))  # occupies the number: sent at 0.3
        await trio.sleep(1)
        for _ in range(3):  # t=1,2,3: queued behind the 6 s spacing, counted
            h.delivery.put(alarm())
            await trio.sleep(1)
        await trio.sleep(10 - (trio.current_time() - h.t0))
        late = [h.delivery.put(alarm()) for _ in range(2)]  # t=10: after it was sent
        await trio.sleep(10)
        late.append(h.delivery.put(alarm()))  # t=20
        await until_done(h, 7)
        # the repeat window opens when the repeated alarm was sent (6.3) and lasts 60 s;
        # its summary is a status notice (3 s gather): 69.3
        assert rel(h, h.sender.calls) == [0.3, 6.3, 69.3]
        assert "(×3 en 1 min)" in h.sender.calls[1].text
        assert "se repitió 3 veces más" in h.sender.calls[2].text
        acked_at = {a[0]: round(a[2] - h.t0, 6) for a in h.delivery.acked}
        assert all(acked_at[e.id] == 69.3 for e in late)
        assert sorted(acked_at.values()).count(6.3) == 3
        # "otra", the three merged ones, then the summary carrying the three late ones
        assert [len(ids) for _, ids in h.told.messages] == [1, 3, 3]


async def test_after_window_a_new_message_starts(autojump_clock):
    async with running(settings(dedup_window=60)) as h:
        h.delivery.put(alarm())
        await trio.sleep(61)
        h.delivery.put(alarm())
        await until_done(h, 2)
        assert rel(h, h.sender.calls) == [0.3, 61.3]
        assert all("×" not in c.text for c in h.sender.calls)


async def test_prueba_never_coalesces(autojump_clock):
    async with running(settings()) as h:
        h.delivery.put(alarm(prueba=True))
        h.delivery.put(alarm(prueba=True))
        await until_done(h, 2)
        (call,) = h.sender.calls  # one digest, two lines: never counted as repeats
        assert call.text.startswith("[PRUEBA] 🚨 2 alertas — Cota\n")
        assert call.text.count("[PRUEBA] 🚨 ALARMA CRITICA — sede principal") == 2
        assert "×" not in call.text
        assert [len(ids) for _, ids in h.told.messages] == [2]  # both, in one message


async def test_transient_then_success_respects_retry_after(autojump_clock):
    async with running(settings()) as h:
        h.sender.script[A] = [TransientDelivery("429", sink="whatsapp", retry_after=2.0)]
        h.delivery.put(alarm())
        await until_done(h, 1)
        assert rel(h, h.sender.calls) == [0.3, 2.3]
        assert round(h.delivery.acked[0][2] - h.t0, 6) == 2.3
        assert h.metrics.retries.labels(sink="whatsapp")._value.get() == 1


async def test_transient_backoff_is_capped_full_jitter(autojump_clock):
    async with running(settings()) as h:
        h.sender.script[A] = [TransientDelivery("down", sink="whatsapp") for _ in range(9)]
        h.delivery.put(alarm())
        await until_done(h, 1)
        times = [c.at for c in h.sender.calls]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert len(gaps) == 9
        for attempt, gap in enumerate(gaps):
            assert 0 <= gap <= min(30.0, 0.5 * 2**attempt) + 1e-9


async def test_permanent_rejection_is_dead_lettered_and_not_retried(autojump_clock, caplog):
    caplog.set_level(logging.DEBUG)
    async with running(settings()) as h:
        h.sender.always[A] = lambda: WhatsAppRejected("cloud HTTP 400 code 131047", code="131047")
        entry = h.delivery.put(alarm())
        await until_done(h, 1)
        await trio.sleep(300)
        assert len(h.sender.calls) == 1
        assert h.delivery.acked == []
        (dead_id, reason, detail, _) = h.delivery.dead[0]
        assert (dead_id, reason) == (entry.id, "whatsapp_131047")
        assert "+57******2233" in detail
    assert "573001112233" not in caplog.text


async def test_one_permanent_recipient_of_two_still_acks(autojump_clock, caplog):
    caplog.set_level(logging.DEBUG)
    s = settings(empresas=[{"id": "cota", "contactos": [A, B]}])
    async with running(s) as h:
        h.sender.always[A] = lambda: WhatsAppRejected("code 131026", code="131026")
        h.delivery.put(alarm())
        await until_done(h, 1)
        assert [a[1] for a in h.delivery.acked] == ["ok"]
        assert h.delivery.dead == []
        assert {c.to for c in h.sender.calls} == {A, B}
    assert "573001112233" not in caplog.text
    assert "+57******2233" in caplog.text


async def test_slow_number_does_not_block_others(autojump_clock):
    s = settings(empresas=[{"id": "cota", "contactos": [A, B]}, {"id": "funza", "contactos": [C]}])
    async with running(s) as h:
        h.sender.always[A] = lambda: TransientDelivery("timeout", sink="whatsapp", retry_after=25)
        h.delivery.put(alarm(desc="uno"))
        await trio.sleep(1)
        h.delivery.put(alarm(desc="dos"))
        h.delivery.put(alarm(empresa="funza"))
        await trio.sleep(20)
        assert rel(h, h.sender.to(B)) == [0.3, 6.3]
        assert rel(h, h.sender.to(C)) == [1.3]
        assert [e[0] for e in h.delivery.acked] == ["m-3"]  # cota's wait for A
        h.sender.always.clear()
        await until_done(h, 3)
        # A's failed first message is retried with "dos" folded in: one digest
        assert rel(h, h.sender.to(A)) == [0.3, 25.3]
        assert "uno" in h.sender.to(A)[1].text
        assert "dos" in h.sender.to(A)[1].text


async def test_recipients_central_skipped_and_silent_tipos(autojump_clock):
    async with running(settings()) as h:
        h.delivery.put(alarm(empresa="chia"))  # unknown -> central
        h.delivery.put(alarm(empresa=""))  # missing -> central (different key)
        h.delivery.put(alarm(empresa="funza"))  # built-in, no contacts -> skipped
        h.delivery.put(alarm(tipo="heartbeat", detail={}))  # never notifies -> skipped
        h.delivery.put(alarm(tipo="configuracion", detail={}))
        h.delivery.put(alarm(tipo="estado", detail={"status": "online"}))  # panel online: no
        h.delivery.put(
            alarm(tipo="estado", origen="watchdog", detail={"status": "offline"}, sede="")
        )
        await until_done(h, 7)
        outcomes = {a[0]: a[1] for a in h.delivery.acked}
        assert [outcomes[f"m-{i}"] for i in range(1, 8)] == [
            "ok",
            "ok",
            "skipped",
            "skipped",
            "skipped",
            "skipped",
            "ok",
        ]
        (digest,) = h.sender.to(CENTRAL)  # the two central alarms share one message
        assert round(digest.at - h.t0, 6) == 0.3
        assert "empresa «chia» (no configurada)" in digest.text
        assert "empresa sin identificar" in digest.text
        assert h.sender.to(A)[0].text.startswith("📴 PANEL SIN CONEXIÓN — Cota")
        # the two alarms to central in one message, the offline event to A
        assert sorted((n, len(ids)) for n, ids in h.told.messages) == sorted([(CENTRAL, 2), (A, 1)])


async def test_post_shares_spacing_and_logs_when_refused(autojump_clock, caplog):
    async with running(settings()) as h:
        h.delivery.put(alarm())
        await trio.sleep(1)
        await h.sink.post([A, B, A], "Alarma atendida por +57******4455")
        await trio.sleep(10)
        assert rel(h, h.sender.to(B)) == [1.3]
        assert rel(h, h.sender.to(A)) == [0.3, 6.3]
        h.sender.always[C] = lambda: WhatsAppRejected("code 131047", code="131047")
        await h.sink.post([C], "hola")
        await h.sink.post([], "nadie")
        await trio.sleep(10)
        assert len(h.sender.to(C)) == 1  # refused for good: never retried
        assert "WhatsApp to +57******8899 refused for good" in caplog.text
        assert h.told.failures == []  # a direct text carries no outbox event


async def test_template_params_are_passed(autojump_clock):
    async with running(settings()) as h:
        h.delivery.put(alarm())
        await until_done(h, 1)
        assert h.sender.calls[0].params == (
            "Cota (sede principal)",
            "ALARMA CRITICA",
            h.sender.calls[0].params[2] if h.sender.calls[0].params else "",
        )
        assert h.sender.calls[0].params is not None
        assert h.sender.calls[0].params[2].startswith("Fallo en sistema · ")


async def test_entries_in_flight_are_bounded(autojump_clock):
    async with running(settings(), max_in_flight=3) as h:
        h.sender.always[A] = lambda: TransientDelivery("down", sink="whatsapp", retry_after=5)
        for i in range(10):
            h.delivery.put(alarm(desc=f"d{i}"))
        await trio.sleep(60)
        assert h.delivery.read_total == 3
        assert h.delivery.read_total - h.delivery.done() == 3  # in flight
        lanes = h.sink.lane_statistics()
        assert lanes is not None
        assert (lanes.keys, lanes.pending) == (1, 1)  # one worker: A's, retrying
        h.sender.always.clear()
        await until_done(h, 10)
        assert h.delivery.read_total == 10
        assert h.delivery.read_total - h.delivery.done() == 0


# -- per-number digests (issue 10) -------------------------------------------


def offline(dispositivo: str, *, origen: str = "watchdog", sede: str = "principal") -> Event:
    return alarm(
        tipo="estado",
        origen=origen,
        sede=sede,
        dispositivo=dispositivo,
        detail={"status": "offline"},
    )


def semaforo_event(colour: str, **kw: Any) -> Event:
    return alarm(tipo="semaforos", detail={"tipo_alarma": colour}, **kw)


class PairRateSender(RecordingSender):
    """Answers 131056 like Meta when one number gets two messages within ``pair`` seconds."""

    def __init__(self, pair: float) -> None:
        super().__init__()
        self.pair = pair
        self.last: dict[str, float] = {}
        self.throttled = 0

    async def send_text(
        self, to: str, text: str, *, template_params: tuple[str, str, str] | None = None
    ) -> str:
        await super().send_text(to, text, template_params=template_params)
        now = trio.current_time()
        if now - self.last.get(to, -math.inf) < self.pair:
            self.throttled += 1
            raise WhatsAppThrottled("cloud HTTP 429 code 131056", code="131056", status=429)
        self.last[to] = now
        return f"wamid.{len(self.calls)}"


@asynccontextmanager
async def running_with(s: Settings, sender: RecordingSender, **kw: Any) -> AsyncIterator[Harness]:
    delivery = FakeDelivery()
    told = Told()
    metrics = Metrics()
    kw.setdefault("observer", told)
    sink = WhatsAppSink(s, sender, metrics=metrics, rng=random.Random(7), **kw)
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run, delivery)
            yield Harness(sink, delivery, sender, trio.current_time(), told, metrics)
            nursery.cancel_scope.cancel()
    delivery.close()


async def test_incident_burst_two_messages_per_contact_under_the_pair_rate(autojump_clock):
    """Must-show 10.1 at unit level: 6 alarms in 0.3 s, then 4 more 1 s apart."""
    s = settings(empresas=[{"id": "cota", "nombre": "Cota", "contactos": [A, B]}])
    sender = PairRateSender(pair=5.5)
    async with running_with(s, sender) as h:
        published: dict[str, float] = {}
        for i in range(6):
            published[f"Incendio sede {i}"] = trio.current_time() - h.t0
            h.delivery.put(alarm(desc=f"Incendio sede {i}", sede=f"s{i}"))
            await trio.sleep(0.06)
        for i in range(6, 10):
            await trio.sleep(1.0)
            published[f"Incendio sede {i}"] = trio.current_time() - h.t0
            h.delivery.put(alarm(desc=f"Incendio sede {i}", sede=f"s{i}"))
        await until_done(h, 10)
        assert sender.throttled == 0
        for number in (A, B):
            calls = sender.to(number)
            assert len(calls) == 2
            first, second = calls
            assert first.text.startswith("🚨 6 alertas — Cota\n")
            assert first.at - h.t0 <= 1.0
            for desc, at in published.items():
                told = next(c for c in calls if desc in c.text)
                assert told.at - h.t0 - at <= 8.0, desc
            assert second.text.startswith("🚨 4 alertas — Cota\n")
            assert round(second.at - first.at, 6) == 6.0
        assert len(h.delivery.acked) == 10
        for number in (A, B):
            assert sum(len(ids) for n, ids in h.told.messages if n == number) == 10


async def test_digest_is_ordered_by_urgency_and_counts_repeats(autojump_clock):
    s = settings(empresas=[{"id": "cota", "nombre": "Cota", "contactos": [A]}])
    async with running(s) as h:
        h.delivery.put(offline("p1", origen="mqtt"))
        h.delivery.put(semaforo_event("VERDE"))
        h.delivery.put(alarm(desc="Humo"))
        h.delivery.put(semaforo_event("AZUL", sede="norte"))
        for _ in range(3):
            h.delivery.put(alarm(desc="Humo"))
        await until_done(h, 7)
        (call,) = h.sender.calls
        assert round(call.at - h.t0, 6) == 0.3
        lines = call.text.split("\n")
        assert lines[0] == "🚨 7 avisos — Cota"
        assert lines[1].startswith("🚨 ALARMA CRITICA — sede principal: Humo ×4 · ")
        assert lines[2].startswith("🔵 SEMÁFORO AZUL — sede norte: código azul")
        assert lines[3].startswith("🟢 SEMÁFORO VERDE — sede principal: normal · ")
        assert lines[4].startswith("📴 PANEL SIN CONEXIÓN — sede principal, panel p1: ")
        assert len(lines) == 5
        assert call.params is not None
        assert call.params[:2] == ("Cota", "🚨 7 avisos")
        assert "\n" not in call.params[2]


async def test_status_storm_never_delays_an_alarm(autojump_clock):
    """Must-show 10.2 at unit level: 20 offline notices from p1 in 2 s, then p2's CRITICA."""
    async with running(settings()) as h:
        for _ in range(20):
            h.delivery.put(offline("p1", origen="mqtt"))
            await trio.sleep(0.1)
        published = trio.current_time()
        h.delivery.put(alarm(desc="Asalto", dispositivo="p2"))
        await until_done(h, 21)
        told = next(c for c in h.sender.calls if "Asalto" in c.text)
        assert told.at - published <= 7.0
        assert h.sender.calls.index(told) == 0  # the storm did not even get its own message
        lines = told.text.split("\n")
        assert "Asalto" in lines[1]  # first line after the header
        assert "PANEL SIN CONEXIÓN" in lines[2]
        assert "×20" in lines[2]
        assert len(h.sender.calls) == 1


async def test_throttled_number_waits_for_its_slot_and_folds_in_newcomers(autojump_clock):
    async with running(settings()) as h:
        h.sender.script[A] = [
            WhatsAppThrottled("code 131056", code="131056", status=429),
            WhatsAppThrottled("code 130429", code="130429", status=429, retry_after=10.0),
        ]
        h.delivery.put(alarm(desc="uno"))
        await trio.sleep(2)
        h.delivery.put(alarm(desc="dos"))  # arrives while A is held back
        await until_done(h, 2)
        # 0.3 refused (131056): +6 s; 6.3 refused with Retry-After 10: +10 s
        assert rel(h, h.sender.calls) == [0.3, 6.3, 16.3]
        assert "uno" in h.sender.calls[2].text
        assert "dos" in h.sender.calls[2].text
        assert h.metrics.retries.labels(sink="whatsapp")._value.get() == 2


async def test_mass_offline_becomes_one_summary_per_contact(autojump_clock):
    s = settings(empresas=[{"id": "cota", "nombre": "Cota", "contactos": [A, B]}])
    async with running(s) as h:
        for i in range(12):
            h.delivery.put(offline(f"hb{i:02d}"))
            await trio.sleep(0.05)
        await until_done(h, 12)
        for number in (A, B):
            (call,) = h.sender.to(number)
            assert call.text.startswith("📴 12 paneles sin conexión — Cota: principal/hb00, ")
            assert "y 2 más" in call.text
            assert call.params is not None
            assert call.params[:2] == ("Cota", "📴 12 paneles sin conexión")
        assert [a[1] for a in h.delivery.acked] == ["ok"] * 12


async def test_escalations_of_many_alarms_at_once_are_one_digest(autojump_clock):
    async with running(settings()) as h:
        for i in range(5):
            await h.sink.post([CENTRAL], f"⚠️ SIN ATENDER (aviso 1/3) 🚨 ALARMA CRITICA — n{i}")
        await trio.sleep(30)
        (call,) = h.sender.to(CENTRAL)
        assert all(f"n{i}" in call.text for i in range(5))
        assert call.text.startswith("⚠️ 5 avisos\n")
        assert call.params is None  # texts only: plain text even with a template


async def test_long_digest_shows_ten_lines_then_the_rest_counted(autojump_clock):
    async with running(settings()) as h:
        for i in range(25):
            h.delivery.put(alarm(desc=f"alarma {i:02d} " + "x" * 2000, sede=f"s{i}"))
        await until_done(h, 25)
        (call,) = h.sender.calls
        lines = call.text.split("\n")
        assert lines[0] == "🚨 25 alertas — Cota"
        assert len(lines) == 12
        assert lines[-1].startswith("… y 15 más")
        assert len(call.text) <= 4096
        assert all(len(line) < 400 for line in lines)


async def test_64_kib_description_is_cut_to_whatsapp_limits(autojump_clock):
    """Must-show 10.6 at unit level: text ≤ 4,096; template parameters one line ≤ 1,024."""
    async with running(settings(template="alerta")) as h:
        h.delivery.put(alarm(desc=("línea\n\tcon tabs   y espacios " * 3000)[:65536]))
        await until_done(h, 1)
        (call,) = h.sender.calls
        assert len(call.text) <= 4096
        assert len(call.text.encode("utf-16-le")) // 2 <= 4096
        assert call.text.endswith("…")
        assert call.params is not None
        for p in call.params:
            assert len(p) <= 1024
            assert "\n" not in p
            assert "\t" not in p
            assert "    " not in p
        assert call.params[2].endswith("…")


async def test_observer_gets_every_event_of_a_digest(autojump_clock):
    seen: list[tuple[str, str | None, list[str]]] = []

    class Observer:
        def sent(self, number: str, message_id: str | None, event_ids: Any) -> None:
            seen.append((number, message_id, list(event_ids)))

        def failed(self, number: str, event_ids: Any, reason: str) -> None:
            raise AssertionError("nothing fails here")

    s = settings(empresas=[{"id": "cota", "contactos": [A, B]}])
    sender = PairRateSender(pair=5.5)
    async with running_with(s, sender, observer=Observer()) as h:
        events = [alarm(desc=d) for d in ("uno", "dos", "dos")]
        for e in events:
            h.delivery.put(e)
        await until_done(h, 3)
        ids = sorted(e.id for e in events)
        assert sorted(n for n, _, _ in seen) == [A, B]
        assert all(sorted(got) == ids for _, _, got in seen)
        assert all(mid is not None and mid.startswith("wamid.") for _, mid, _ in seen)


README_FIRST = """\
🚨 6 alertas — Cota
🚨 ALARMA CRITICA — sede norte: Incendio en bodega · 14:32
🚨 ALARMA CRITICA — sede sur: Humo en cocina · 14:32
🚨 ALARMA CRITICA — sede principal: Asalto en portería · 14:32
🚨 ALARMA CRITICA — sede occidente: Persona herida · 14:32
🚨 ALARMA CRITICA — sede oriente: Fuga de gas · 14:32
🚨 ALARMA CRITICA — sede centro: Intrusión en parqueadero · 14:32"""
README_SECOND = """\
🚨 8 avisos — Cota
🚨 ALARMA CRITICA — sede norte: Robo en recepción · 14:33
🔴 SEMÁFORO ROJO — sede sur: emergencia · 14:33
🟡 SEMÁFORO AMARILLO — sede principal: precaución · 14:33
📴 PANEL SIN CONEXIÓN — sede sur, panel p3: el panel reportó offline ×5 · 14:33"""
README_PANELS = (
    "📴 12 paneles sin conexión — Cota: bodega/p1, bodega/p2, bodega/p3, bodega/p4, bodega/p5, "
    "bodega/p6, bodega/p7, bodega/p8, bodega/p9, bodega/p10 y 2 más · 14:34"
)


async def test_readme_incident_example(autojump_clock):
    """The incident shown in the README ("Cómo se ve un incidente en el teléfono")."""
    t = 1_714_678_330 * 10**9  # 14:32 in Bogota
    minute = 60 * 10**9
    s = settings(empresas=[{"id": "cota", "nombre": "Cota", "contactos": [A]}])
    async with running(s) as h:
        sedes = {
            "norte": "Incendio en bodega",
            "sur": "Humo en cocina",
            "principal": "Asalto en portería",
            "occidente": "Persona herida",
            "oriente": "Fuga de gas",
            "centro": "Intrusión en parqueadero",
        }
        for sede, desc in sedes.items():
            h.delivery.put(alarm(desc=desc, sede=sede, received_ns=t))
            await trio.sleep(0.05)
        await trio.sleep(1)
        h.delivery.put(alarm(desc="Robo en recepción", sede="norte", received_ns=t + minute))
        h.delivery.put(semaforo_event("ROJO", sede="sur", received_ns=t + minute))
        for _ in range(5):
            h.delivery.put(
                alarm(
                    tipo="estado",
                    sede="sur",
                    dispositivo="p3",
                    detail={"status": "offline"},
                    received_ns=t + minute,
                )
            )
        h.delivery.put(semaforo_event("AMARILLO", received_ns=t + minute))
        await until_done(h, 14)
        assert [c.text for c in h.sender.calls] == [README_FIRST, README_SECOND]
        assert rel(h, h.sender.calls) == [0.55, 6.55]
    async with running(s) as h:
        for i in range(12):
            h.delivery.put(
                alarm(
                    tipo="estado",
                    origen="watchdog",
                    sede="bodega",
                    dispositivo=f"p{i + 1}",
                    detail={"status": "offline"},
                    received_ns=t + 2 * minute,
                )
            )
        await until_done(h, 12)
        assert [c.text for c in h.sender.calls] == [README_PANELS]
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for text in (README_FIRST, README_SECOND, README_PANELS):
        assert text in readme
