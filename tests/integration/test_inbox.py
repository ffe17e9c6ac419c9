"""The inbox on a real redis-server (and on its memory fallback): undecodable entries are
logged, counted and dead-lettered before they are acknowledged; no log line of the inbox
path holds a full phone number; lanes keep order per sender."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from tests.support.procs import Redis as RedisProc

from botonera_bridge.inbound.inbox import GROUP, Inbox
from botonera_bridge.inbound.ws_receiver import Inbound
from botonera_bridge.metrics import Metrics
from botonera_bridge.queues.link import RedisLink
from botonera_bridge.queues.outbox import DeadLetters
from botonera_bridge.queues.redis_client import Redis, open_redis
from botonera_bridge.queues.streams import DurableStream

A = "+573001112233"
B = "+573004445566"
CEILING = 10.0


@asynccontextmanager
async def inbox_on(url: str) -> AsyncIterator[tuple[Inbox, DeadLetters, Metrics, Redis | None]]:
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        if url:
            async with open_redis(url) as redis:
                link = RedisLink(redis, metrics=metrics)
                await nursery.start(link.run)
                yield _build(link, metrics) + (redis,)
        else:
            link = RedisLink(None, metrics=metrics)
            yield _build(link, metrics) + (None,)
        nursery.cancel_scope.cancel()


def _build(link: RedisLink, metrics: Metrics) -> tuple[Inbox, DeadLetters, Metrics]:
    dead = DeadLetters(link, "t:dead", metrics)
    stream = DurableStream(
        link, "t:inbox", (GROUP,), consumer="c1", memory_limit=100, dedup_prefix="t:seen:"
    )
    return Inbox(stream, dead=dead, metrics=metrics), dead, metrics


@pytest.fixture(params=["redis", "memory"])
def where(request: pytest.FixtureRequest, make_redis) -> str:  # type: ignore[no-untyped-def]
    if request.param == "memory":
        return ""
    server: RedisProc = make_redis()
    return server.url


async def test_undecodable_entry_logged_and_dead_lettered(
    where: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    handled: list[Inbound] = []
    done = trio.Event()

    async def handle(msg: Inbound) -> None:
        handled.append(msg)
        if msg.id.endswith("_0002"):
            raise RuntimeError(f"a bug that quotes {msg.sender} and {msg.id}")
        if len(handled) == 3:
            done.set()

    with trio.fail_after(CEILING):
        async with inbox_on(where) as (inbox, dead, metrics, redis):
            await inbox.stream.append([(b"\xc1 not msgpack", "")])  # e.g. an older format
            for n in (1, 2, 3):
                await inbox.append(Inbound(f"false_{A[1:]}@c.us_{n:04d}", A, "ESTADO", 1))
            await inbox.append(Inbound(f"false_{A[1:]}@c.us_0001", A, "ESTADO", 1))  # repeat
            async with trio.open_nursery() as nursery:
                await nursery.start(inbox.run, handle)
                await done.wait()
                with trio.move_on_after(0.3):
                    while await inbox.stream.depth(GROUP):  # noqa: ASYNC110 - observed from outside
                        await trio.sleep(0.02)
                assert await inbox.stream.depth(GROUP) == 0  # everything acked, after its fate
                nursery.cancel_scope.cancel()
            if redis is not None:
                assert int(await redis.execute("XLEN", "t:dead")) == 1
            else:
                assert len(dead.memory) == 1
                assert dead.memory[0].reason == "inbox_undecodable"
    assert [m.id[-4:] for m in handled] == ["0001", "0002", "0003"]  # in order, deduped
    rejected = metrics.rejected.labels(source="inbox", reason="undecodable")._value.get()
    assert rejected == 1
    assert metrics.dead_letters.labels(reason="inbox_undecodable")._value.get() == 1
    assert metrics.rejected.labels(source="inbox", reason="handler_error")._value.get() == 1
    assert "cannot be decoded" in caplog.text
    assert "dead-lettered" in caplog.text
    assert "command from +57******2233 failed (message false_+57******2233@c.us_0002)" in (
        caplog.text
    )
    for record in caplog.records:  # no full number in any log line from the inbox path
        assert A[1:] not in record.getMessage()
        assert B[1:] not in record.getMessage()


async def test_lanes_are_per_sender_and_bounded() -> None:
    gate = trio.Event()
    seen: list[str] = []
    ids: list[str] = []

    async def handle(msg: Inbound) -> None:
        seen.append(msg.sender)
        ids.append(msg.id)
        if msg.sender == A:
            await gate.wait()  # A's lane is stuck: B's proceeds

    with trio.fail_after(CEILING):
        async with inbox_on("") as (inbox, _, _, _):
            await inbox.append(Inbound("a1", A, "x", 1))
            await inbox.append(Inbound("a2", A, "x", 1))
            await inbox.append(Inbound("b1", B, "x", 1))
            async with trio.open_nursery() as nursery:
                await nursery.start(inbox.run, handle)
                while B not in seen:  # noqa: ASYNC110 - observed from outside
                    await trio.sleep(0.01)
                assert sorted(seen) == sorted([A, B])  # lanes start in either order
                assert inbox.pending == 2  # a1 in progress, a2 waiting behind it
                lanes = inbox.lane_statistics()
                assert lanes is not None
                assert lanes.keys == 1  # B's lane ended with its one message
                gate.set()
                while inbox.pending:  # noqa: ASYNC110 - observed from outside
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    assert [i for i in ids if i.startswith("a")] == ["a1", "a2"]  # in order per sender


async def test_timelines_persist_in_redis_with_the_alarm_board(make_redis) -> None:  # type: ignore[no-untyped-def]
    """Timelines live in the alarm board's hash: a restart (new store, loaded from the
    real Redis) finds them, with the message-id index rebuilt for later receipts."""
    import json
    import time

    from botonera_bridge.intake.topics import decode_mqtt
    from botonera_bridge.queues.hashes import RedisHashes
    from botonera_bridge.queues.state import HashStore
    from botonera_bridge.watch.alarms import AlarmBook
    from botonera_bridge.watch.receipts import Receipt, Timelines

    server: RedisProc = make_redis()
    payload = json.dumps({"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "id": 7}).encode()
    event = decode_mqtt(payload, "empresas/cota/principal", time.time_ns(), 65536)[1]
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery, open_redis(server.url) as redis:
            link = RedisLink(redis)
            await nursery.start(link.run)
            store = HashStore("t:alarms", RedisHashes(link))
            book = AlarmBook(store, escalation_after=300, escalation_max=3)
            timelines = Timelines(store)
            timelines.track(book.observe(event))
            timelines.sent(A, "wamid.SEVEN", [event.id])
            timelines.backend_result(event.id, 200, True)
            assert timelines.sync() == 1
            assert await book.flush()

            again = HashStore("t:alarms", RedisHashes(link))
            await again.load()
            restored = Timelines(again)
            assert restored.summary(event.id) == {"reached": 1, "read_by": 0}
            assert restored.receipt(Receipt(message_id="wamid.SEVEN", status="read"))
            data = restored.public(event.id)
            assert data is not None
            assert data["read_by"] == 1
            assert data["backend"]["status"] == 200
            assert AlarmBook(again, escalation_after=300, escalation_max=3).get(event.id)
            nursery.cancel_scope.cancel()
