"""Micro-benchmark of the durable stream's hot path: append -> read -> ack.

Starts its own redis-server on a free loopback port (killed by PID at the end), and runs
N appends of one item each (as the router does per MQTT message) while one reader per
group (``backend``, ``whatsapp``, as the outbox) reads and acknowledges everything, with
``run_maintenance`` batching the acks. Reported per scenario, median of ``--runs``:
CPU microseconds of this process per item, and Redis round trips per item (
round trips: the client's pipeline calls, liveness PINGs excepted).

Scenarios: ``redis`` (both groups want every item), ``redis-skip`` (every item skips
``whatsapp``, as most events do when nobody is to be told), ``memory`` (no Redis: the
bounded in-memory implementation).

    .venv/bin/python bench/queues_streams.py [-n 5000] [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import trio
import trio.lowlevel

from botonera_bridge.queues.link import RedisLink
from botonera_bridge.queues.redis_client import Redis, open_redis
from botonera_bridge.queues.streams import DurableStream

GROUPS = ("backend", "whatsapp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Counted:
    """Counts round trips of a Redis client (``execute`` goes through ``pipeline``),
    liveness PINGs excepted."""

    def __init__(self, redis: Redis) -> None:
        self.trips = 0
        pipeline = redis.pipeline

        async def counted(commands: Sequence[Sequence[Any]], **kw: Any) -> list[Any]:
            if commands[0][0] != "PING":
                self.trips += 1
            return await pipeline(commands, **kw)

        redis.pipeline = counted  # type: ignore[method-assign]


async def _one_run(
    redis: Redis | None, counter: _Counted | None, n: int, key: str, skips: Sequence[str]
) -> tuple[float, float]:
    link = RedisLink(redis)
    stream = DurableStream(link, key, GROUPS, consumer="bench", memory_limit=n + 10)
    readers = [g for g in GROUPS if g not in skips]
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        nursery.start_soon(stream.run_maintenance, 3600.0)
        done = {g: trio.Event() for g in readers}

        async def reader(group: str) -> None:
            got = 0
            while got < n:
                items = await stream.read(group, 100)
                await stream.ack(group, [i.id for i in items])
                got += len(items)
            done[group].set()

        for g in readers:
            nursery.start_soon(reader, g)
        await trio.sleep(0.1)  # readers waiting: the steady state
        before = counter.trips if counter is not None else 0
        cpu = time.process_time()
        item_skips = [frozenset(skips)] if skips else None
        for i in range(n):
            data = b'{"seq":%d,"tipo_mensaje":"alarmas"}' % i
            await stream.append([(data, "")], skips=item_skips)
            await trio.lowlevel.checkpoint()  # the readers run between two messages
        for ev in done.values():
            await ev.wait()
        cpu = time.process_time() - cpu
        await trio.sleep(0.1)  # the last batched acks
        after = counter.trips if counter is not None else 0
        nursery.cancel_scope.cancel()
    return cpu / n * 1e6, (after - before) / n


async def _bench(port: int, n: int, runs: int) -> None:
    async with open_redis(f"redis://127.0.0.1:{port}/0") as redis:
        with trio.fail_after(10):
            while True:
                try:
                    await redis.execute("PING")
                    break
                except Exception:  # noqa: BLE001 - still starting
                    await trio.sleep(0.05)
        counter = _Counted(redis)
        scenarios: dict[str, tuple[Redis | None, Sequence[str]]] = {
            "redis": (redis, ()),
            "redis-skip": (redis, ("whatsapp",)),
            "memory": (None, ()),
        }
        for name, (r, skips) in scenarios.items():
            cpus, trips = [], []
            for run in range(runs):
                key = f"bench:{name}:{run}"
                cpu, trip = await _one_run(r, counter if r else None, n, key, skips)
                cpus.append(cpu)
                trips.append(trip)
            print(
                f"{name:11s} n={n} runs={runs}: {statistics.median(cpus):7.1f} µs CPU/item "
                f"(min {min(cpus):.1f}, max {max(cpus):.1f}); "
                f"{statistics.median(trips):.2f} Redis round trips/item",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    exe = shutil.which("redis-server")
    assert exe, "redis-server not on PATH"
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(  # noqa: S603 - our own redis-server, private port
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            trio.run(_bench, port, args.n, args.runs)
        finally:
            proc.kill()  # by PID: only the server this script started
            proc.wait()


if __name__ == "__main__":
    main()
