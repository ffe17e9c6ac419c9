"""Shared fixtures and helpers for the fault-injection scenarios (issue 3, "Must show").

Every scenario runs real processes: a private mosquitto (persistence on), a private
redis-server (appendonly), the reference backend and the bridge itself as a subprocess
(`python -m botonera_bridge run`). Faults are injected by signalling those processes by
PID (SIGKILL, SIGTERM) or through the backend's `/_test/fault` API. Every wait is bounded.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil
import pytest

from tests.support.backend import Backend
from tests.support.bridge import BridgeProc, Publisher

EMPRESAS = ("cota", "tocancipa", "funza", "madrid")
# one WhatsApp contact per empresa, for the scenarios that watch both sinks
CONTACTS = dict(
    zip(EMPRESAS, ("+573001110001", "+573001110002", "+573001110003", "+573001110004"), strict=True)
)


def cloud_whatsapp(api_url: str, **extra: Any) -> dict[str, Any]:
    """Config for the Cloud API test server, with CONTACTS as the empresas' contactos."""
    return {
        "whatsapp": {
            "provider": "cloud",
            "api_url": api_url,
            "phone_number_id": "1055",
            "token": "wa-tok",
            "min_interval": 1.0,
        }
        | extra,
        "empresas": [{"id": e, "contactos": [c]} for e, c in CONTACTS.items()],
    }


@pytest.fixture
def bridge_factory(bridge_factory, redis_server) -> Callable[..., BridgeProc]:
    """The root `bridge_factory`, with this test's Redis by default: durability on."""

    def make(**kw: Any) -> BridgeProc:
        kw.setdefault("redis_url", redis_server.url)
        return bridge_factory(**kw)

    return make


def alarm(seq: int, empresa: str, **extra: Any) -> dict[str, Any]:
    """A distinct QoS-1 alarm with its own identity (`seq`), like a botonera sends."""
    return {
        "tipo_mensaje": "alarmas",
        "tipo_alarma": "CRITICA",
        "descripcion": f"alarma {seq}",
        "empresa": empresa,
        "seq": seq,
        **extra,
    }


def alarms(n: int, start: int = 0, empresas: Iterable[str] = EMPRESAS) -> list[dict[str, Any]]:
    emp = tuple(empresas)
    return [alarm(i, emp[i % len(emp)]) for i in range(start, start + n)]


class PacedPublisher(threading.Thread):
    """Publishes payloads from a thread at about `rate` per second, so a fault can be
    injected mid-stream. `published` counts calls made; `infos` keeps paho's handles."""

    def __init__(self, pub: Publisher, payloads: list[dict[str, Any]], rate: float) -> None:
        super().__init__(daemon=True)
        self.pub = pub
        self.payloads = payloads
        self.rate = rate
        self.published = 0
        self.sent_at: list[float] = []  # time.time() of each publish call
        self.infos: list[Any] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        for i, p in enumerate(self.payloads):
            if self._halt.is_set():
                return
            ahead = t0 + i / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            self.sent_at.append(time.time())
            self.infos.append(self.pub.publish(p))
            self.published += 1

    def finish(self, timeout: float) -> None:
        """Wait for every publish to be sent and acknowledged by the broker."""
        self.join(timeout)
        assert not self.is_alive(), f"publisher still running after {timeout}s"
        # paho keeps a QoS-1 publish made while disconnected (rc NO_CONN) and sends it after
        # reconnecting; wait_for_publish() would raise on that rc, so read the flag itself.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(_acked(i) for i in self.infos):
            time.sleep(0.05)
        unacked = sum(1 for info in self.infos if not _acked(info))
        assert unacked == 0, f"{unacked} publishes never acknowledged by the broker"

    def stop(self) -> None:
        self._halt.set()


def _acked(info: Any) -> bool:
    with info._condition:
        return bool(info._published)


def backend_seqs(backend: Backend) -> set[int]:
    return {a["payload"]["seq"] for a in backend.alerts() if "seq" in a["payload"]}


def keys_by_seq(backend: Backend) -> dict[int, set[str]]:
    """seq -> every Idempotency-Key any POST for it carried (refused attempts included)."""
    out: dict[int, set[str]] = {}
    for r in backend.requests():
        payload = r["payload"] or {}
        if "seq" in payload:
            out.setdefault(payload["seq"], set()).add(r["idempotency_key"])
    return out


def wait_all_seqs(
    backend: Backend, expected: set[int], timeout: float, every: float = 0.5
) -> set[int]:
    """Poll the backend until every expected seq is stored; assert with what is missing."""
    deadline = time.monotonic() + timeout
    got: set[int] = set()
    while time.monotonic() < deadline:
        try:
            got = backend_seqs(backend)
        except OSError:
            got = set()
        if got >= expected:
            return got
        time.sleep(every)
    missing = sorted(expected - got)
    raise AssertionError(
        f"{len(missing)} of {len(expected)} alarms never reached the backend within {timeout}s; "
        f"first missing seqs: {missing[:20]}"
    )


def metrics(bridge: BridgeProc) -> dict[str, float]:
    """The bridge's /metrics as {'name{labels}': value}."""
    code, body = bridge.http("/metrics")
    assert code == 200, body
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+)\s+(\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


class RssSampler(threading.Thread):
    """Samples a process's RSS every `every` seconds until stopped; `peak` in bytes."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
