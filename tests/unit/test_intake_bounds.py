"""Bounded work per step on the intake path: hash flushes in chunks, and a flood of
unconfigured empresas logged as a few lines and a summary, not one line each."""

from __future__ import annotations

import json
import logging
import time

import pytest

from botonera_bridge.config import Settings
from botonera_bridge.intake import router as router_mod
from botonera_bridge.intake.router import Router
from botonera_bridge.messages import decode
from botonera_bridge.metrics import Metrics
from botonera_bridge.queues.state import FLUSH_CHUNK, HashStore


class RecordingHashes:
    """The HashBackend seam: records what each command carried."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.data: dict[str, bytes] = {}

    async def hgetall(self, key: str) -> dict[str, bytes]:
        return dict(self.data)

    async def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        self.calls.append(("hset", len(mapping)))
        self.data.update(mapping)

    async def hdel(self, key: str, fields: list[str]) -> None:
        self.calls.append(("hdel", len(fields)))
        for f in fields:
            self.data.pop(f, None)


async def test_flush_writes_thousands_of_fields_in_chunks() -> None:
    backend = RecordingHashes()
    store = HashStore("k", backend)
    for i in range(FLUSH_CHUNK * 2 + 10):
        store.set(f"f{i}", b"v")
    store.delete("f0")
    assert await store.flush()
    assert all(n <= FLUSH_CHUNK for _, n in backend.calls), backend.calls
    assert len(backend.data) == FLUSH_CHUNK * 2 + 9
    assert "f0" not in backend.data
    assert store.dirty == 0


def test_unconfigured_empresas_logged_a_few_then_summarised(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = Router(Settings(), None, metrics=Metrics(), observers=[])  # type: ignore[arg-type]
    now = [1000.0]
    monkeypatch.setattr(router_mod.time, "monotonic", lambda: now[0])
    caplog.set_level(logging.WARNING, "botonera_bridge.intake.router")
    for n in range(50):
        payload = json.dumps({"tipo_mensaje": "alarmas", "empresa": f"nueva{n}"}).encode()
        router._warn_unknown(decode(payload, "empresas", time.time_ns(), 65536)[1])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == router_mod.UNKNOWN_LOG_MAX
    now[0] += router_mod.UNKNOWN_LOG_WINDOW
    payload = json.dumps({"tipo_mensaje": "alarmas", "empresa": "otra"}).encode()
    router._warn_unknown(decode(payload, "empresas", time.time_ns(), 65536)[1])
    lines = [r.getMessage() for r in caplog.records]
    assert "45 more events from unconfigured empresas" in lines[-2], lines[-2:]
    assert "'otra' is not configured" in lines[-1]
