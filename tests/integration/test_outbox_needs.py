"""Outbox: an event a sink does not need skips that sink's group at append time."""

from __future__ import annotations

import trio

from botonera_bridge.messages import Event
from botonera_bridge.metrics import Metrics
from botonera_bridge.queues.link import RedisLink
from botonera_bridge.queues.outbox import DeadLetters, Outbox, whatsapp_needs
from botonera_bridge.queues.redis_client import open_redis


def ev(tipo: str, event_id: str, **kw: object) -> Event:
    base: dict[str, object] = {
        "id": event_id,
        "tipo": tipo,
        "empresa": "cota",
        "sede": "principal",
        "dispositivo": "",
        "topic": "empresas",
        "recibido_en": "",
        "origen": "mqtt",
        "payload": b"{}",
        "received_ns": 1,
    }
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


def test_whatsapp_needs_mirrors_the_sink() -> None:
    needs = whatsapp_needs(lambda e: ("+573001112233",) if e.empresa == "cota" else ())
    assert needs(ev("alarmas", "1"))
    assert not needs(ev("alarmas", "2", empresa="funza"))  # nobody to send to
    assert not needs(ev("configuracion", "3"))
    assert not needs(ev("heartbeat", "4"))
    assert needs(ev("configuracion", "5", empresa="funza", prueba=True))  # receipts wait on it


async def test_unneeded_events_skip_the_whatsapp_group(redis_server) -> None:
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as n:
        link = RedisLink(redis, metrics=Metrics())
        await n.start(link.run)
        outbox = Outbox(
            link, "t", consumer="c1", memory_limit=100, dead=DeadLetters(link, "t:dead")
        )
        outbox.needed_by["whatsapp"] = whatsapp_needs(lambda e: ("+573001112233",))
        events = [ev("alarmas", "a1"), ev("configuracion", "c1"), ev("estado", "e1")]
        await outbox.append([(e, e.id) for e in events])
        assert outbox.finished_count["whatsapp"]["skipped"] == 2
        assert outbox.finished_count["backend"]["skipped"] == 0
        wa = outbox.delivery("whatsapp")
        backend = outbox.delivery("backend")
        with trio.fail_after(5):
            assert [x.event.id for x in await wa.read(10)] == ["a1"]
            got: list[str] = []
            while len(got) < 3:
                got += [x.event.id for x in await backend.read(10)]
        assert got == ["a1", "c1", "e1"]
        n.cancel_scope.cancel()
