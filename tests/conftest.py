"""Shared fixtures: private mosquitto, redis-server and reference backend processes.

Plain sync fixtures (STYLE.md habit 15): pytest-trio async fixtures live for one test,
and these are ordinary subprocesses anyway. Each test gets fresh instances on free
loopback ports; teardown kills them by PID and removes their temp dirs.

- `mosquitto` -> procs.Mosquitto (started; `.url` "127.0.0.1:PORT", `.port`, `.kill()`,
  `.stop()`, `.start()`, `.restart()`)
- `redis_server` -> procs.Redis (started, appendonly; `.url` "redis://127.0.0.1:PORT/0",
  `.wipe()` when stopped)
- `backend` -> tests.support.backend.Backend (started; `.url`, `.requests()`, `.alerts()`,
  `.fault(**kw)`, `.clear_fault()`, `.wait_for(...)`, `.wait_for_async(...)`)
- `make_mosquitto(**kw)`, `make_redis(**kw)`, `make_backend(**kw)` -> factories for tests
  that need other options (no persistence, a token, several instances); all started
  instances are cleaned up at teardown.

Tests that need mosquitto or redis-server are skipped, with the reason, only when the
binary is not installed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.backend import Backend
from tests.support.bridge import BridgeProc, Publisher
from tests.support.procs import Mosquitto, Redis

BINARIES = {"mosquitto": "mosquitto", "redis": "redis-server"}
_SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _find(cmd: str) -> str | None:
    return shutil.which(cmd) or shutil.which(cmd, path=_SBIN_PATH)


def pytest_report_header(config: pytest.Config) -> list[str]:
    found = {name: _find(cmd) for name, cmd in BINARIES.items()}
    return [
        "servers: "
        + ", ".join(f"{cmd}={found[name] or 'MISSING'}" for name, cmd in BINARIES.items())
    ]


@pytest.fixture(scope="session")
def server_binaries() -> dict[str, str | None]:
    """Session-wide: path of each server binary, or None when it is not installed."""
    return {name: _find(cmd) for name, cmd in BINARIES.items()}


def _require(binaries: dict[str, str | None], name: str) -> None:
    if binaries[name] is None:
        cmd = BINARIES[name]
        pytest.skip(f"{cmd} is not installed (apt-get install {cmd}); test needs a real {cmd}")


@pytest.fixture
def make_mosquitto(server_binaries: dict[str, str | None]) -> Iterator[Callable[..., Mosquitto]]:
    """Factory: `make_mosquitto(port=None, persistence=True, extra="")` -> started broker."""
    _require(server_binaries, "mosquitto")
    started: list[Mosquitto] = []

    def make(port: int | None = None, *, extra: str = "", **kw: Any) -> Mosquitto:
        broker = Mosquitto(port, extra=extra, **kw)
        started.append(broker)
        broker.start()
        return broker

    yield make
    for broker in started:
        broker.cleanup()


@pytest.fixture
def make_redis(server_binaries: dict[str, str | None]) -> Iterator[Callable[..., Redis]]:
    """Factory: `make_redis(port=None, appendonly=True)` -> started redis-server."""
    _require(server_binaries, "redis")
    started: list[Redis] = []

    def make(port: int | None = None, **kw: Any) -> Redis:
        server = Redis(port, **kw)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.cleanup()


@pytest.fixture
def make_backend() -> Iterator[Callable[..., Backend]]:
    """Factory: `make_backend(port=None, token=None, empresas=None, quiet=False)` -> started."""
    started: list[Backend] = []

    def make(port: int | None = None, **kw: Any) -> Backend:
        backend = Backend(port, **kw)
        started.append(backend)
        backend.start()
        return backend

    yield make
    for backend in started:
        backend.cleanup()


@pytest.fixture
def mosquitto(make_mosquitto: Callable[..., Mosquitto]) -> Mosquitto:
    """A fresh private broker for this test (persistence on)."""
    return make_mosquitto()


@pytest.fixture
def redis_server(make_redis: Callable[..., Redis]) -> Redis:
    """A fresh private redis-server for this test (appendonly on)."""
    return make_redis()


@pytest.fixture
def backend(make_backend: Callable[..., Backend]) -> Backend:
    """A fresh reference backend for this test (no token; empresas cota, tocancipa, funza,
    madrid)."""
    return make_backend()


@pytest.fixture
def bridge_factory(mosquitto: Mosquitto, backend: Backend) -> Iterator[Callable[..., BridgeProc]]:
    """Factory: `bridge_factory(redis_url=..., conf={...}, env={...})` -> a BridgeProc wired
    to this test's broker and backend (not started); every one is killed at teardown."""
    made: list[BridgeProc] = []

    def make(**kw: Any) -> BridgeProc:
        kw.setdefault("mqtt_port", mosquitto.port)
        kw.setdefault("backend_url", backend.url)
        bridge = BridgeProc(**kw)
        made.append(bridge)
        return bridge

    yield make
    for bridge in made:
        # shown by pytest for a failing test only
        print(f"--- bridge log {bridge.log} (last 3000 chars) ---\n{bridge.log_text()[-3000:]}")
        bridge.cleanup()


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Publisher]:
    """A QoS 1 publisher on this test's broker, like a botonera."""
    pub = Publisher(mosquitto.port)
    yield pub
    pub.close()
