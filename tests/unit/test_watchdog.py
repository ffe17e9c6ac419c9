"""Watchdog under a virtual clock: exact offline/online times, restarts without storms."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from botonera_bridge import messages
from botonera_bridge.intake.topics import decode_mqtt
from botonera_bridge.messages import Event
from botonera_bridge.metrics import Metrics
from botonera_bridge.queues.state import HashStore
from botonera_bridge.sinks.backend import wire_body
from botonera_bridge.watch.watchdog import Watchdog

TIMEOUT = 90.0
KEY = "botonera:devices"


def msg(
    dispositivo: str = "p1",
    *,
    empresa: str = "cota",
    sede: str = "principal",
    tipo: str = "heartbeat",
    **extra: object,
) -> Event:
    obj: dict[str, object] = {"tipo_mensaje": tipo, **extra}
    if empresa:
        obj["empresa"] = empresa
    if sede:
        obj["sede"] = sede
    if dispositivo:
        obj["dispositivo"] = dispositivo
    return decode_mqtt(json.dumps(obj).encode(), "empresas", 0, 65536)[1]


class Recorder:
    """The emit callback: remembers each event with the virtual time it was emitted."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []

    async def __call__(self, event: Event) -> None:
        self.events.append((trio.current_time(), event))

    def summary(self) -> list[tuple[float, str, str]]:
        return [(t, e.device_key, e.detail["status"]) for t, e in self.events]


class FakeRedisHash:
    """A HashBackend that outlives HashStores (as Redis outlives the bridge)."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, bytes]] = {}
        self.writes = 0
        self.down = False

    async def hgetall(self, key: str) -> dict[str, bytes]:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise ConnectionError("redis down")
        return dict(self.hashes.get(key, {}))

    async def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise ConnectionError("redis down")
        self.writes += 1
        self.hashes.setdefault(key, {}).update(mapping)

    async def hdel(self, key: str, fields: list[str]) -> None:
        await trio.lowlevel.checkpoint()
        for f in fields:
            self.hashes.get(key, {}).pop(f, None)


@asynccontextmanager
async def running(wd: Watchdog) -> AsyncIterator[Watchdog]:
    async with trio.open_nursery() as nursery:
        await nursery.start(wd.run)
        yield wd
        nursery.cancel_scope.cancel()


def make(
    store: HashStore, rec: Recorder, metrics: Metrics | None = None, timeout: float = TIMEOUT
) -> Watchdog:
    return Watchdog(timeout=timeout, store=store, emit=rec, metrics=metrics, wall=trio.current_time)


async def sleep_to(t: float) -> None:
    await trio.sleep_until(t)


def gauge(metrics: Metrics, state: str) -> float:
    for fam in text_string_to_metric_families(metrics.render().decode()):
        if fam.name == "botonera_devices":
            for s in fam.samples:
                if s.labels.get("state") == state:
                    return float(s.value)
    raise AssertionError("botonera_devices not exported")


async def test_offline_exactly_at_timeout_then_online_on_next_message(autojump_clock) -> None:
    rec, metrics = Recorder(), Metrics()
    with trio.fail_after(1000):
        async with running(make(HashStore(KEY, None), rec, metrics)) as wd:
            await sleep_to(10.0)
            wd.seen(msg("p1"))
            await sleep_to(10.0 + TIMEOUT - 0.001)
            assert rec.events == []
            assert gauge(metrics, "online") == 1
            await sleep_to(200.0)
            assert rec.summary() == [(100.0, "cota/principal/p1", "offline")]
            assert gauge(metrics, "offline") == 1
            assert gauge(metrics, "online") == 0
            assert [d.state for d in wd.devices()] == ["offline"]

            t, off = rec.events[0]
            body = json.loads(off.payload)
            assert body == {
                "tipo_mensaje": "estado",
                "status": "offline",
                "empresa": "cota",
                "sede": "principal",
                "dispositivo": "p1",
                "ultimo_visto": messages.now_rfc3339(10 * 10**9),
                "timestamp": messages.now_rfc3339(100 * 10**9),
            }
            assert (off.tipo, off.origen, off.topic) == (
                "estado",
                "watchdog",
                "botonera-bridge/watchdog",
            )
            assert (off.empresa, off.sede, off.dispositivo) == ("cota", "principal", "p1")
            assert off.detail == {"status": "offline"}
            bridge = json.loads(wire_body(off))["_bridge"]
            assert bridge["origen"] == "watchdog"
            assert bridge["id"] == off.id

            await sleep_to(250.5)
            wd.seen(msg("p1", tipo="alarmas", tipo_alarma="CRITICA"))  # any message counts
            await sleep_to(251.0)
            assert rec.summary()[1:] == [(250.5, "cota/principal/p1", "online")]
            online = rec.events[1][1]
            assert json.loads(online.payload)["ultimo_visto"] == messages.now_rfc3339(10 * 10**9)
            assert online.id != off.id
            assert gauge(metrics, "online") == 1
            assert gauge(metrics, "offline") == 0
            # silent again: offline a full timeout after the last message
            await sleep_to(400.0)
            assert rec.summary()[2:] == [(250.5 + TIMEOUT, "cota/principal/p1", "offline")]


async def test_heartbeats_keep_device_online_and_check_is_precise(autojump_clock) -> None:
    rec = Recorder()
    with trio.fail_after(10_000):
        async with running(make(HashStore(KEY, None), rec, timeout=7.3)) as wd:
            for i in range(100):
                await sleep_to(0.25 + i * 7.0)  # just under the timeout each time
                wd.seen(msg("p1"))
            last = 0.25 + 99 * 7.0
            await sleep_to(last + 7.3 - 1e-6)
            assert rec.events == []
            await sleep_to(last + 100)
            assert rec.summary() == [(last + 7.3, "cota/principal/p1", "offline")]


async def test_restart_no_storm_and_offline_a_full_timeout_after_restart(autojump_clock) -> None:
    redis = FakeRedisHash()
    rec1, rec2, metrics2 = Recorder(), Recorder(), Metrics()
    names = [f"p{i:02d}" for i in range(20)]
    with trio.fail_after(10_000):
        async with running(make(HashStore(KEY, redis), rec1)) as wd1:
            for step in range(4):  # 20 panels, staggered heartbeats every 30 s
                for i, name in enumerate(names):
                    await sleep_to(step * 30.0 + i * 0.5)
                    wd1.seen(msg(name))
            await sleep_to(120.0)
        assert rec1.events == []
        assert len(redis.hashes[KEY]) == 20
        stored = json.loads(redis.hashes[KEY]["cota/principal/p00"])
        assert stored == {
            "last_seen": 90.0,
            "state": "online",
            "empresa": "cota",
            "sede": "principal",
            "dispositivo": "p00",
        }

        # the bridge is down for 10 minutes: every device's last_seen is far older than
        # the timeout; a naive watchdog would declare all 20 offline at start-up
        await sleep_to(720.0)
        async with running(make(HashStore(KEY, redis), rec2, metrics2)) as wd2:
            assert [d.state for d in wd2.devices()] == ["online"] * 20
            assert gauge(metrics2, "online") == 20
            for step in range(10):  # all but p19 keep talking
                for i, name in enumerate(names[:-1]):
                    await sleep_to(720.0 + 5.0 + step * 30.0 + i * 0.5)
                    wd2.seen(msg(name))
                if step == 2:
                    assert rec2.events == []
            # p19 is declared offline exactly one full timeout after the restart
            assert rec2.summary() == [(720.0 + TIMEOUT, "cota/principal/p19", "offline")]
            assert json.loads(rec2.events[0][1].payload)["ultimo_visto"] == (
                messages.now_rfc3339(int(99.5 * 1e9))
            )
            assert gauge(metrics2, "offline") == 1
            assert gauge(metrics2, "online") == 19


async def test_restart_persisted_offline_talks_again_emits_online(autojump_clock) -> None:
    redis = FakeRedisHash()
    rec1, rec2 = Recorder(), Recorder()
    with trio.fail_after(10_000):
        async with running(make(HashStore(KEY, redis), rec1)) as wd1:
            wd1.seen(msg("p1"))
            wd1.seen(msg("p2"))
            await sleep_to(60.0)
            wd1.seen(msg("p2"))
            await sleep_to(100.0)
        assert rec1.summary() == [(90.0, "cota/principal/p1", "offline")]

        await sleep_to(500.0)
        async with running(make(HashStore(KEY, redis), rec2)) as wd2:
            assert {d.key: d.state for d in wd2.devices()} == {
                "cota/principal/p1": "offline",
                "cota/principal/p2": "online",
            }
            await sleep_to(510.0)
            wd2.seen(msg("p2"))  # persisted online, talks: nothing
            wd2.seen(msg("p1"))  # persisted offline, talks: online
            await sleep_to(520.0)
            assert rec2.summary() == [(510.0, "cota/principal/p1", "online")]
            assert json.loads(rec2.events[0][1].payload)["ultimo_visto"] == (
                messages.now_rfc3339(0)
            )


async def test_crash_before_state_written_reemits_with_same_id(autojump_clock) -> None:
    """Redis away when the offline event went out, then the bridge dies: after the
    restart the device is declared offline again, with the same event id, so the
    backend's Idempotency-Key drops the repeat."""
    redis = FakeRedisHash()
    rec1, rec2 = Recorder(), Recorder()
    with trio.fail_after(10_000):
        async with running(make(HashStore(KEY, redis), rec1)) as wd1:
            wd1.seen(msg("p1"))
            await sleep_to(5.0)
            assert json.loads(redis.hashes[KEY]["cota/principal/p1"])["state"] == "online"
            redis.down = True
            await sleep_to(100.0)
        assert rec1.summary() == [(90.0, "cota/principal/p1", "offline")]
        redis.down = False
        async with running(make(HashStore(KEY, redis), rec2)) as wd2:
            await sleep_to(300.0)
            assert rec2.summary() == [(100.0 + TIMEOUT, "cota/principal/p1", "offline")]
            assert rec2.events[0][1].id == rec1.events[0][1].id
            assert wd2.devices()[0].state == "offline"
        assert json.loads(redis.hashes[KEY]["cota/principal/p1"])["state"] == "offline"


async def test_bounded_store_writes(autojump_clock) -> None:
    redis = FakeRedisHash()
    with trio.fail_after(1000):
        async with running(make(HashStore(KEY, redis), Recorder())) as wd:
            for i in range(1000):  # 100 messages a second for 10 s, 20 devices
                wd.seen(msg(f"p{i % 20}"))
                await trio.sleep(0.01)
            writes = redis.writes
        assert 5 <= writes <= 12  # about one flush per second, not one per message
        assert len(redis.hashes[KEY]) == 20


async def test_message_while_offline_emit_blocks_is_ordered(autojump_clock) -> None:
    """emit blocks (outbox full); the device talks meanwhile: offline then online."""
    gate = trio.Event()
    got: list[tuple[float, str]] = []

    async def slow_emit(ev: Event) -> None:
        if ev.detail["status"] == "offline":
            await gate.wait()
        got.append((trio.current_time(), ev.detail["status"]))

    wd = Watchdog(
        timeout=TIMEOUT, store=HashStore(KEY, None), emit=slow_emit, wall=trio.current_time
    )
    with trio.fail_after(1000):
        async with running(wd):
            wd.seen(msg("p1"))
            await sleep_to(95.0)
            wd.seen(msg("p1"))
            await sleep_to(120.0)
            gate.set()
            await sleep_to(121.0)
            assert got == [(120.0, "offline"), (120.0, "online")]
            assert wd.devices()[0].state == "online"
            await sleep_to(95.0 + TIMEOUT + 1)
            assert got[2:] == [(95.0 + TIMEOUT, "offline")]


async def test_ignored_messages_and_device_keys(autojump_clock) -> None:
    rec = Recorder()
    with trio.fail_after(1000):
        async with running(make(HashStore(KEY, None), rec)) as wd:
            wd.seen(msg("", sede=""))  # cota/-/-
            wd.seen(msg("p9", empresa="", sede=""))  # no empresa: not a panel
            wd.seen(msg("p1", tipo="alarmas", prueba=True))  # send-test from the CLI
            own = messages.synthetic(
                {"tipo_mensaje": "estado"},
                origen="watchdog",
                topic="x",
                received_ns=0,
                empresa="cota",
            )
            wd.seen(own)
            assert [d.key for d in wd.devices()] == ["cota/-/-"]
            await sleep_to(200.0)
            assert rec.summary() == [(TIMEOUT, "cota/-/-", "offline")]
            assert msgspec.json.decode(rec.events[0][1].payload).keys() == {
                "tipo_mensaje",
                "status",
                "empresa",
                "ultimo_visto",
                "timestamp",
            }


def test_rejects_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="positive"):
        Watchdog(timeout=0, store=HashStore(KEY, None), emit=Recorder())


def counter(metrics: Metrics, name: str) -> float:
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            if s.name == name:
                return float(s.value)
    raise AssertionError(f"{name} not exported")


async def test_only_what_promised_to_beat_is_watched(autojump_clock) -> None:
    """Alarms, semáforos and estado never make a panel watched; an identified heartbeat
    does, and from then on any of its messages refreshes it; a heartbeat without an
    empresa is counted, not watched."""
    rec, metrics = Recorder(), Metrics()
    with trio.fail_after(1000):
        async with running(make(HashStore(KEY, None), rec, metrics, timeout=3.0)) as wd:
            wd.seen(msg("", empresa="madrid", sede="norte", tipo="alarmas"))
            wd.seen(msg("p7", sede="sur", tipo="semaforos", tipo_alarma="ROJO"))
            wd.seen(msg("", empresa="", sede="", tipo="estado", status="online"))
            wd.seen(msg("", empresa="", sede=""))  # heartbeat, no identity
            wd.seen(msg("hb1"))
            assert [d.key for d in wd.devices()] == ["cota/principal/hb1"]
            assert [d.key for d in wd.devices("cota")] == ["cota/principal/hb1"]
            assert wd.devices("madrid") == []
            assert counter(metrics, "botonera_heartbeats_unidentified_total") == 1
            await sleep_to(2.0)
            wd.seen(msg("hb1", tipo="alarmas"))  # watched now: an alarm refreshes it
            await sleep_to(20.0)
            assert rec.summary() == [(5.0, "cota/principal/hb1", "offline")]


async def test_listed_panel_never_seen_is_nunca_visto(autojump_clock) -> None:
    rec, metrics = Recorder(), Metrics()
    wd = Watchdog(
        timeout=3.0,
        store=HashStore(KEY, None),
        emit=rec,
        metrics=metrics,
        wall=trio.current_time,
        inventory=[("cota", "principal", "p1"), ("cota", "norte", "p2"), ("funza", "", "")],
    )
    with trio.fail_after(1000):
        async with running(wd):
            assert wd.devices() == []  # not due yet
            await sleep_to(1.0)
            wd.seen(msg("p2", sede="norte", tipo="alarmas"))  # listed: any message counts
            await sleep_to(3.5)
            states = {d.key: d.state for d in wd.devices()}
            assert states == {
                "cota/principal/p1": "nunca visto",
                "cota/norte/p2": "online",
                "funza/-/-": "nunca visto",
            }
            assert gauge(metrics, "nunca_visto") == 2
            assert rec.events == []  # never online: no offline event
            wd.seen(msg("p1"))
            await sleep_to(4.5)
            assert rec.summary() == [(4.0, "cota/norte/p2", "offline")]
            assert gauge(metrics, "nunca_visto") == 1
            await sleep_to(9.0)
            assert rec.summary()[1:] == [(6.5, "cota/principal/p1", "offline")]


async def test_max_devices_cap_warns_once_and_gauges_are_incremental(
    autojump_clock, caplog
) -> None:
    rec, metrics = Recorder(), Metrics()
    wd = Watchdog(
        timeout=TIMEOUT,
        store=HashStore(KEY, None),
        emit=rec,
        metrics=metrics,
        wall=trio.current_time,
        max_devices=50,
    )
    events = [msg(f"d{i}") for i in range(80)]
    with trio.fail_after(1000):
        async with running(wd):
            with caplog.at_level(logging.WARNING, logger="botonera_bridge.watch.watchdog"):
                for ev in events:
                    wd.seen(ev)
            assert len(wd.devices()) == 50
            assert gauge(metrics, "online") == 50
            assert counter(metrics, "botonera_devices_capped_total") == 30
            warnings = [r for r in caplog.records if "max_devices" in r.getMessage()]
            assert len(warnings) == 1
            wd.seen(events[0])  # a known device still refreshes
            await sleep_to(TIMEOUT + 1)
            assert gauge(metrics, "offline") == 50
            assert gauge(metrics, "online") == 0


async def test_forget_after(autojump_clock) -> None:
    redis = FakeRedisHash()
    rec, metrics = Recorder(), Metrics()
    wd = Watchdog(
        timeout=10.0,
        store=HashStore(KEY, redis),
        emit=rec,
        metrics=metrics,
        wall=trio.current_time,
        forget_after=100.0,
    )
    with trio.fail_after(10_000):
        async with running(wd):
            wd.seen(msg("old"))
            await sleep_to(50.0)
            wd.seen(msg("new"))
            await sleep_to(120.0)
            wd.seen(msg("new"))
            await sleep_to(230.0)
            assert [d.key for d in wd.devices()] == ["cota/principal/new"]
            assert [d.key for d in wd.devices("cota")] == ["cota/principal/new"]
            assert counter(metrics, "botonera_devices_forgotten_total") == 1
            assert gauge(metrics, "offline") == 1
        assert list(redis.hashes[KEY]) == ["cota/principal/new"]


async def test_supervised_loop_restarts_after_a_bug_and_redeclares(autojump_clock) -> None:
    """The app's supervisor restarts ``loop`` after a bug in emit: the offline transition
    it interrupted is declared again, with the same id, and the watchdog goes on."""
    from botonera_bridge.health import Health
    from botonera_bridge.lifecycle import supervise

    got: list[tuple[float, Event]] = []
    calls = 0

    async def buggy_emit(ev: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected bug")
        got.append((trio.current_time(), ev))

    wd = Watchdog(timeout=10.0, store=HashStore(KEY, None), emit=buggy_emit, wall=trio.current_time)
    health = Health(60.0)
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            await wd.load()
            nursery.start_soon(supervise, "watchdog", health, wd.loop)
            wd.seen(msg("p1"))
            wd.seen(msg("p2"))
            await sleep_to(5.0)
            wd.seen(msg("p2"))
            await sleep_to(40.0)
            keys = [(e.device_key, e.detail["status"]) for _, e in got]
            assert keys == [("cota/principal/p1", "offline"), ("cota/principal/p2", "offline")]
            assert 10.0 < got[0][0] <= 12.0  # after the supervisor's backoff
            assert got[1][0] == 15.0
            assert {d.key: d.state for d in wd.devices()} == {
                "cota/principal/p1": "offline",
                "cota/principal/p2": "offline",
            }
            nursery.cancel_scope.cancel()


async def test_reload_changes_the_listed_panels(autojump_clock) -> None:
    """SIGHUP: a newly listed panel is expected from the reload on; an unlisted panel that
    never showed up is dropped; nothing seen is forgotten."""
    rec, metrics = Recorder(), Metrics()
    wd = Watchdog(
        timeout=3.0,
        store=HashStore(KEY, None),
        emit=rec,
        metrics=metrics,
        wall=trio.current_time,
        inventory=[("cota", "principal", "p1"), ("cota", "norte", "p2")],
    )
    with trio.fail_after(1000):
        async with running(wd):
            wd.seen(msg("p2", sede="norte"))
            await sleep_to(3.5)
            assert {d.key: d.state for d in wd.devices()} == {
                "cota/principal/p1": "nunca visto",
                "cota/norte/p2": "offline",
            }
            wd.reconfigure([("cota", "norte", "p2"), ("funza", "", "p9")])
            await sleep_to(6.0)  # p9 is listed since 3.5: still within its first timeout
            assert {d.key: d.state for d in wd.devices()} == {"cota/norte/p2": "offline"}
            assert gauge(metrics, "nunca_visto") == 0
            await sleep_to(7.0)
            assert {d.key: d.state for d in wd.devices()} == {
                "cota/norte/p2": "offline",
                "funza/-/p9": "nunca visto",
            }
            assert gauge(metrics, "nunca_visto") == 1
            assert rec.summary() == [(3.0, "cota/norte/p2", "offline")]
