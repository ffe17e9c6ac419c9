"""AlarmBook: open alarms, semáforos, acknowledgements, escalation schedule, persistence."""

from __future__ import annotations

import json
import time
from functools import partial

import pytest
import trio
import trio.testing

from botonera_bridge.intake.topics import decode_mqtt
from botonera_bridge.messages import Event
from botonera_bridge.queues.state import HashStore
from botonera_bridge.watch import alarms
from botonera_bridge.watch.alarms import AlarmBook

AFTER = 300.0


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def event(
    tipo: str = "alarmas", *, topic: str = "empresas/cota/principal", **fields: object
) -> Event:
    obj: dict[str, object] = {"tipo_mensaje": tipo}
    if tipo == "alarmas":
        obj |= {"tipo_alarma": "CRITICA", "descripcion": "Fallo en sistema"}
    obj |= fields
    return decode_mqtt(json.dumps(obj).encode(), topic, time.time_ns(), 65536)[1]


def semaforo(colour: str, **fields: object) -> Event:
    return event("semaforos", tipo_alarma=colour, **fields)


def make_book(
    clock: FakeClock | None = None, store: HashStore | None = None, max_: int = 3
) -> tuple[AlarmBook, FakeClock, HashStore]:
    clock = clock or FakeClock()
    store = store or HashStore("botonera:alarms", None)
    return AlarmBook(store, escalation_after=AFTER, escalation_max=max_, clock=clock), clock, store


def test_alarm_opens_and_lists_newest_first() -> None:
    book, clock, _ = make_book()
    first = book.observe(event(id=1))
    clock.now += 5
    second = book.observe(event(id=2, descripcion="Puerta forzada"))
    assert first is not None
    assert second is not None
    opened = book.open_alarms("cota")
    assert [a.id for a in opened] == [second.id, first.id]
    assert opened[0].descripcion == "Puerta forzada"
    newest = opened[0]
    assert (newest.empresa, newest.sede, newest.tipo_alarma) == ("cota", "principal", "CRITICA")
    assert opened[1].opened_at == 1_000_000.0
    assert book.open_alarms("funza") == []


def test_observe_is_idempotent_by_event_id() -> None:
    book, _, _ = make_book()
    assert book.observe(event(id=7)) is not None
    assert book.observe(event(id=7)) is None  # MQTT redelivery: same stable id
    assert len(book.open_alarms("cota")) == 1


def test_send_test_events_open_nothing() -> None:
    book, _, _ = make_book()
    assert book.observe(event(prueba=True)) is None
    assert book.open_alarms("cota") == []


def test_other_tipos_open_nothing() -> None:
    book, _, _ = make_book()
    for e in (event("estado", status="offline"), event("heartbeat"), event("configuracion")):
        assert book.observe(e) is None
    assert book.snapshot() == {}


def test_semaforos() -> None:
    book, clock, _ = make_book()
    assert book.semaforo("cota") is None
    assert book.observe(semaforo("verde")) is None
    assert book.semaforo("cota") == ("VERDE", clock.now)
    clock.now += 10
    rojo = book.observe(semaforo("Rojo"))
    assert rojo is not None
    assert (rojo.tipo, rojo.tipo_alarma) == ("semaforos", "ROJO")
    assert book.semaforo("cota") == ("ROJO", clock.now)
    # the panel repeating ROJO does not pile up alarms
    assert book.observe(semaforo("ROJO")) is None
    # VERDE is the new colour but closes nothing
    assert book.observe(semaforo("VERDE")) is None
    assert book.semaforo("cota") == ("VERDE", clock.now)
    assert [a.id for a in book.open_alarms("cota")] == [rojo.id]
    azul = book.observe(semaforo("azul"))
    assert azul is not None
    assert len(book.open_alarms("cota")) == 2
    # unknown colours are kept as they come
    book.observe(semaforo("violeta"))
    assert book.semaforo("cota") == ("VIOLETA", clock.now)


def test_acknowledge_newest_then_next() -> None:
    book, clock, _ = make_book()
    a = book.observe(event(id=1))
    clock.now += 1
    b = book.observe(event(id=2))
    assert a is not None
    assert b is not None
    clock.now += 1
    acked = book.acknowledge("cota", "+573001112233")
    assert acked is not None
    assert acked.id == b.id
    assert (acked.acked_by, acked.acked_at) == ("+573001112233", clock.now)
    assert [x.id for x in book.open_alarms("cota")] == [a.id]
    clock.now += 1  # (ids carry a payload digest now: equal ack times no longer sort by seq)
    assert book.acknowledge("cota", "+573001112233").id == a.id  # type: ignore[union-attr]
    assert book.acknowledge("cota", "+573001112233") is None
    assert [x.id for x in book.acked_alarms("cota")] == [a.id, b.id]


def test_acknowledge_by_id_or_prefix() -> None:
    book, _, _ = make_book()
    a = book.observe(event(id=1))
    b = book.observe(event(id=2))
    assert a is not None
    assert b is not None
    assert book.acknowledge("funza", "+573001112233", a.id) is None  # other empresa
    assert book.acknowledge("cota", "+573001112233", a.id[:3]) is None  # too short
    acked = book.acknowledge("cota", "+573001112233", a.id[:8].upper())
    assert acked is not None
    assert acked.id == a.id
    assert book.acknowledge("cota", "+573001112233", a.id) is None  # already acknowledged
    assert book.find("cota", a.id) == acked
    assert book.open_alarms("cota")[0].id == b.id


def test_escalation_schedule() -> None:
    book, clock, _ = make_book()
    a = book.observe(event(id=1))
    assert a is not None
    t0 = clock.now
    assert book.next_due() == t0 + AFTER
    assert book.due(t0 + AFTER - 0.001) == []
    steps = []
    for k in (1, 2, 3):
        assert book.next_due() == t0 + k * AFTER
        due = book.due(t0 + k * AFTER)
        assert [d.escalations for d in due] == [k]
        assert book.due(t0 + k * AFTER) == []  # marked: not due twice
        steps.append(k)
    assert steps == [1, 2, 3]
    assert book.next_due() is None
    assert book.due(t0 + 100 * AFTER) == []
    assert book.open_alarms("cota")[0].escalations == 3  # still open, no more reminders


def test_acknowledge_stops_escalation() -> None:
    book, clock, _ = make_book()
    book.observe(event(id=1))
    t0 = clock.now
    book.due(t0 + AFTER)
    book.acknowledge("cota", "+573001112233")
    assert book.next_due() is None
    assert book.due(t0 + 10 * AFTER) == []


def test_after_an_outage_only_the_latest_reminder_is_sent() -> None:
    book, clock, _ = make_book()
    book.observe(event(id=1))
    due = book.due(clock.now + 2.5 * AFTER)
    assert [d.escalations for d in due] == [2]
    assert book.next_due() == clock.now + 3 * AFTER


def test_state_survives_a_restart() -> None:
    book, clock, store = make_book()
    a = book.observe(event(id=1))
    book.observe(event(id=2))
    book.observe(semaforo("ROJO"))
    book.acknowledge("cota", "+573001112233", a.id if a else None)
    book.due(clock.now + AFTER)
    again = AlarmBook(store, escalation_after=AFTER, escalation_max=3, clock=clock)
    assert again.snapshot() == book.snapshot()
    assert again.next_due() == book.next_due()
    assert all(f.startswith(("a:", "s:")) for f in store.data)


def test_reload_after_load_and_unreadable_fields_are_dropped() -> None:
    book, clock, store = make_book()
    book.observe(event(id=1))
    fresh = HashStore("botonera:alarms", None)
    other = AlarmBook(fresh, escalation_after=AFTER, escalation_max=3, clock=clock)
    assert other.open_alarms("cota") == []
    fresh.data = dict(store.data) | {"a:broken": b"{not json", "s:cota": b"[]"}
    other.reload()
    assert len(other.open_alarms("cota")) == 1
    assert other.semaforo("cota") is None
    assert "a:broken" not in fresh.data


class Backend:
    def __init__(self) -> None:
        self.hash: dict[str, bytes] = {}
        self.writes: list[float] = []  # trio times of hset calls

    async def hgetall(self, key: str) -> dict[str, bytes]:
        return dict(self.hash)

    async def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        self.writes.append(trio.current_time())
        self.hash.update(mapping)

    async def hdel(self, key: str, fields: list[str]) -> None:
        for f in fields:
            self.hash.pop(f, None)


async def test_flush_writes_through() -> None:
    backend = Backend()
    book, clock, store = make_book(store=HashStore("botonera:alarms", backend))
    book.observe(event(id=1))
    assert book.dirty
    assert await book.flush()
    assert not book.dirty
    restored = HashStore("botonera:alarms", backend)
    await restored.load()
    again = AlarmBook(restored, escalation_after=AFTER, escalation_max=3, clock=clock)
    assert len(again.open_alarms("cota")) == 1


async def test_run_writes_the_book_through_and_once_more_on_exit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = Backend()
    book, _, _ = make_book(store=HashStore("botonera:alarms", backend))
    synced: list[float] = []
    t0 = trio.current_time()
    book.observe(event(id=1))
    assert book.dirty
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(book.run, before_flush=[lambda: synced.append(trio.current_time())])
            )
            assert not book.dirty  # written at start
            await trio.sleep(5.5)  # nothing changed: no write
            book.observe(event(id=2))
            await trio.sleep(1)
            assert not book.dirty  # within one FLUSH_INTERVAL
            book.observe(event(id=3))
            nursery.cancel_scope.cancel()
    assert not book.dirty  # the last change, written on the way out
    assert [round(t - t0, 6) for t in backend.writes] == [0.0, 6.0, 6.5]
    assert len(synced) == 8  # before every write-through, at start, each second, on exit
    assert len([k for k in backend.hash if k.startswith("a:")]) == 3


def test_acknowledged_alarms_are_forgotten_after_a_day() -> None:
    book, clock, store = make_book()
    a = book.observe(event(id=1))
    assert a is not None
    book.acknowledge("cota", "+573001112233")
    clock.now += alarms.ACKED_TTL - 1
    assert book.snapshot()["cota"][0]["id"] == a.id
    clock.now += 1
    assert "cota" not in book.snapshot()  # nothing left to show
    assert "a:" + a.id not in store.data


def test_bounded_per_empresa_acknowledged_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alarms, "MAX_PER_EMPRESA", 5)
    book, clock, _ = make_book()
    ids = []
    for i in range(5):
        clock.now += 1
        opened = book.observe(event(id=i))
        assert opened is not None
        ids.append(opened.id)
    book.acknowledge("cota", "+573001112233", ids[3])
    clock.now += 1
    newest = book.observe(event(id=99))
    assert newest is not None
    kept = {a.id for a in book.open_alarms("cota")} | {a.id for a in book.acked_alarms("cota")}
    # over the limit it is cut back to 90% of it (4 of 5): the acknowledged one first,
    # then the oldest
    assert kept == {ids[1], ids[2], ids[4], newest.id}
    clock.now += 1
    latest = book.observe(event(id=100))
    assert latest is not None
    assert {a.id for a in book.open_alarms("cota")} == {
        ids[1],
        ids[2],
        ids[4],
        newest.id,
        latest.id,
    }


def test_snapshot_shape() -> None:
    book, clock, _ = make_book()
    book.observe(semaforo("ROJO"))
    clock.now += 60
    alarma = book.observe(event(id=1))
    assert alarma is not None
    book.observe(event(id=1, topic="empresas/funza"))
    book.observe(event(id=2, empresa=None, topic="empresas"))
    book.acknowledge("funza", "+573001112233")
    snap = book.snapshot()
    assert set(snap) == {"", "cota", "funza"}
    cota = snap["cota"]
    assert [a["tipo"] for a in cota] == ["alarmas", "semaforos"]  # newest first
    assert cota[0] == {
        "id": alarma.id,
        "tipo": "alarmas",
        "tipo_alarma": "CRITICA",
        "descripcion": "Fallo en sistema",
        "sede": "principal",
        "dispositivo": "",
        "desde": "1970-01-12T13:47:40.000Z",
        "avisos": 0,
        "acuse": None,
    }
    assert cota[1]["tipo_alarma"] == "ROJO"
    assert snap["funza"][0]["acuse"] == {"por": "+57******2233", "en": "1970-01-12T13:47:40.000Z"}
    json.dumps(snap)  # plain data
    # the gauges' counts: the snapshot's unacknowledged alarms per empresa
    assert book.open_counts() == {"": 1, "cota": 2}


def test_invalid_after() -> None:
    with pytest.raises(ValueError, match="positive"):
        AlarmBook(HashStore("k", None), escalation_after=0, escalation_max=3)
