"""CPU per POST of the HTTP clients the backend sink could use, against the bench sink.

Runs in its own process (so os.times() is the client's alone), ``lanes`` concurrent
Trio tasks each POSTing the same ~330-byte alarm body in a loop, keep-alive.

    python bench/http_clients.py --url http://127.0.0.1:PORT --kind http11 --n 8000
prints one JSON line: {"kind", "n", "cpu_us_per_post", "posts_per_s"}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import trio

PATH = "/api/mqtt-alerts/process"
BODY = (
    b'{"tipo_mensaje":"alarmas","empresa":"cota","sede":"principal","dispositivo":"panel-1",'
    b'"tipo_alarma":"CRITICA","descripcion":"Boton de panico","seq":-1,"sent_ns":0,'
    b'"_bridge":{"id":"0190b7a2-7d3c-8e3f-9a1b-2c3d4e5f6a7b","topic":"empresas",'
    b'"recibido_en":"2025-01-01T00:00:00.000Z","origen":"mqtt"}}'
)
HEADERS = {
    "Content-Type": "application/json",
    "User-Agent": "botonera-bridge/0.1.0",
    "Idempotency-Key": "0190b7a2-7d3c-8e3f-9a1b-2c3d4e5f6a7b",
}


async def main(url: str, kind: str, n: int, lanes: int) -> dict[str, object]:
    per_lane = n // lanes
    if kind == "httpx":
        import httpx

        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=lanes * 2)) as client:
            full = url + PATH

            async def one() -> None:
                r = await client.post(full, content=BODY, headers=HEADERS)
                assert r.status_code == 201, r.status_code
                r.text  # noqa: B018 - the sink decodes the body too

            return await _drive(kind, one, per_lane, lanes)
    if kind == "httpcore":
        import httpcore

        async with httpcore.AsyncConnectionPool(max_connections=lanes * 2) as pool:
            full = (url + PATH).encode()
            hdrs = [(k.encode(), v.encode()) for k, v in HEADERS.items()]

            async def one() -> None:
                r = await pool.request(b"POST", full, headers=hdrs, content=BODY)
                assert r.status == 201, r.status

            return await _drive(kind, one, per_lane, lanes)
    from botonera_bridge.sinks.http11 import open_pool

    async with open_pool(url, max_connections=lanes * 2, connect_timeout=5, read_timeout=5) as p:
        hdrs = [(k.encode(), v.encode()) for k, v in HEADERS.items()]

        async def one() -> None:
            status, _, _ = await p.post(PATH, BODY, hdrs)
            assert status == 201, status

        return await _drive(kind, one, per_lane, lanes)


async def _drive(kind: str, one, per_lane: int, lanes: int) -> dict[str, object]:
    async def lane(count: int) -> None:
        for _ in range(count):
            await one()

    async with trio.open_nursery() as nursery:  # warm up: connections, imports, caches
        for _ in range(lanes):
            nursery.start_soon(lane, 100)
    t0, w0 = os.times(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(lanes):
            nursery.start_soon(lane, per_lane)
    t1, w1 = os.times(), time.perf_counter()
    total = per_lane * lanes
    cpu = (t1.user - t0.user) + (t1.system - t0.system)
    return {
        "kind": kind,
        "n": total,
        "cpu_us_per_post": round(cpu / total * 1e6, 1),
        "posts_per_s": round(total / (w1 - w0)),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--kind", choices=("httpx", "httpcore", "http11"), required=True)
    p.add_argument("--n", type=int, default=8000)
    p.add_argument("--lanes", type=int, default=4)
    a = p.parse_args()
    print(json.dumps(trio.run(main, a.url, a.kind, a.n, a.lanes)))
