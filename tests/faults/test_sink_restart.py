"""Issue 9 must-show 8: a backend sink that crashes once (an injected bug) is restarted by
the app's supervisor from a clean state, and delivers that empresa's events again, the
one it crashed on included. Real parts: the outbox on a real redis-server (or memory),
the HTTP/1.1 pool, the reference backend; only the bug is ours."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AsyncExitStack

import pytest
import trio

from botonera_bridge import USER_AGENT
from botonera_bridge.config import BackendSettings
from botonera_bridge.health import Health
from botonera_bridge.intake.topics import decode_mqtt
from botonera_bridge.lifecycle import supervise
from botonera_bridge.queues.link import RedisLink
from botonera_bridge.queues.outbox import DeadLetters, Entry, Outbox
from botonera_bridge.queues.redis_client import open_redis
from botonera_bridge.sinks.backend import BackendSink
from botonera_bridge.sinks.http11 import open_pool
from tests.support.backend import Backend


class BuggySink(BackendSink):
    """Raises once, on the event whose descripcion is "bug", inside its lane."""

    crashed = 0
    crash = trio.Event()

    async def _deliver(self, entry: Entry) -> str:
        if entry.event.detail.get("descripcion") == "bug" and not self.crashed:
            self.crashed += 1
            self.crash.set()
            raise RuntimeError("injected bug")
        return await super()._deliver(entry)


def alarm(empresa: str, seq: int, text: str):  # noqa: ANN201 - an Event
    obj = {"tipo_mensaje": "alarmas", "empresa": empresa, "seq": seq, "descripcion": text}
    return decode_mqtt(json.dumps(obj).encode(), "empresas", time.time_ns(), 65536)[1]


def delivered(backend: Backend) -> Callable[[], list[str]]:
    return lambda: [a["payload"]["descripcion"] for a in backend.alerts()]


@pytest.mark.parametrize("durable", [True, False], ids=["redis", "memory"])
async def test_backend_sink_restarts_clean_after_a_crash(
    backend: Backend, make_redis, durable: bool
) -> None:
    health = Health(60.0)
    settings = BackendSettings(url=backend.url, retry_max_delay=1.0, timeout=5.0)
    with trio.fail_after(30):
        async with AsyncExitStack() as stack:
            redis = None
            if durable:
                redis = await stack.enter_async_context(open_redis(make_redis().url))
            pool = await stack.enter_async_context(
                open_pool(backend.url, max_connections=4, connect_timeout=5, read_timeout=5)
            )
            nursery = await stack.enter_async_context(trio.open_nursery())
            link = RedisLink(redis, health=health)
            await nursery.start(link.run)
            outbox = Outbox(
                link, "t", consumer="c1", memory_limit=1000, dead=DeadLetters(link, "t:dead")
            )
            sink = BuggySink(settings, pool=pool, user_agent=USER_AGENT)
            sink.crash = trio.Event()
            nursery.start_soon(
                supervise, "backend sink", health, lambda: sink.run(outbox.delivery("backend"))
            )
            await outbox.append([(alarm("cota", 1, "antes"), ""), (alarm("cota", 2, "bug"), "")])
            with trio.fail_after(10):
                await sink.crash.wait()
            # the crashed run's lane for cota is gone: new events of cota must not go to
            # a queue nobody reads
            await outbox.append(
                [(alarm("cota", 3, "después"), ""), (alarm("funza", 1, "otra"), "")]
            )
            with trio.fail_after(15):
                got = await backend.wait_for_async(
                    lambda: d if len(d := delivered(backend)()) >= 4 else None
                )
            assert sorted(got) == ["antes", "bug", "después", "otra"]
            assert [d for d in got if d != "otra"] == ["antes", "bug", "después"]  # in order
            assert sink.crashed == 1
            with trio.fail_after(5):
                await backend.wait_for_async(lambda: sink.pending == 0)
            lanes = sink.lane_statistics()
            assert lanes is not None
            assert (lanes.keys, lanes.pending) == (0, 0)  # none left behind
            nursery.cancel_scope.cancel()
