"""sd_notify over a real unix datagram socket (real time, short intervals)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from botonera_bridge.health import Health
from botonera_bridge.status import sdnotify


async def recv_all(sock: trio.socket.SocketType, seconds: float) -> list[str]:
    out: list[str] = []
    with trio.move_on_after(seconds):
        while True:
            out.append((await sock.recv(4096)).decode())
    return out


def healthy() -> Health:
    h = Health(stall_timeout=60)
    h.require("mqtt")
    h.set("mqtt", True)
    return h


async def bound(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    return sock


async def test_ready_then_watchdog_also_through_an_outage(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    health, ready = healthy(), trio.Event()
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}  # ping every 50 ms
    with trio.fail_after(20), await bound(path) as sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: sdnotify.notify_loop(
                    health, ready, env=env, task_status=task_status
                )
            )
            assert await recv_all(sock, 0.2) == []  # nothing before subscribed

            ready.set()
            got = await recv_all(sock, 0.3)
            assert got[0] == "READY=1"
            assert got[1:3] == ["WATCHDOG=1", "STATUS=listo"]
            assert 2 <= got.count("WATCHDOG=1") <= 8

            # a broker outage is reported, and never withholds the watchdog (issue 11)
            health.set("mqtt", False, "connection lost")
            got = await recv_all(sock, 0.3)
            assert "STATUS=no listo: mqtt: connection lost" in got
            assert got.count("WATCHDOG=1") >= 2

            health.set("mqtt", True)
            got = await recv_all(sock, 0.3)
            assert "STATUS=listo" in got
            assert got.count("WATCHDOG=1") >= 2
            assert "READY=1" not in got  # once only
            nursery.cancel_scope.cancel()


async def test_unhealthy_status_reported(tmp_path: Path) -> None:
    path = str(tmp_path / "n.sock")
    health, ready = Health(stall_timeout=60), trio.Event()
    health.task_died("router", "boom")
    ready.set()
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}
    with trio.fail_after(20), await bound(path) as sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: sdnotify.notify_loop(health, ready, env=env))
            got = await recv_all(sock, 0.3)
            nursery.cancel_scope.cancel()
    assert got == ["READY=1", "STATUS=no listo: task router died: boom"]


async def test_abstract_socket_and_stopping() -> None:
    name = f"botonera-test-{os.getpid()}-{id(object())}"
    health, ready = healthy(), trio.Event()
    ready.set()
    env = {"NOTIFY_SOCKET": "@" + name}  # default interval: 5 s
    with trio.fail_after(20), await bound("\0" + name) as sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: sdnotify.notify_loop(health, ready, env=env))
            got = await recv_all(sock, 0.3)
            nursery.cancel_scope.cancel()
        assert got == ["READY=1", "WATCHDOG=1", "STATUS=listo"]
        assert sdnotify.stopping(env=env) is True
        assert (await sock.recv(4096)).decode() == "STOPPING=1\nSTATUS=deteniendo"


async def test_noop_without_notify_socket() -> None:
    ready = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: sdnotify.notify_loop(
                    healthy(), ready, env={}, task_status=task_status
                )
            )
    assert sdnotify.stopping(env={}) is False
    assert sdnotify.notify("READY=1", env={}) is False


async def test_missing_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ready = trio.Event()
    ready.set()
    env = {"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "100000"}
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: sdnotify.notify_loop(healthy(), ready, env=env))
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # once, not every ping
    assert "systemd notify 'READY' failed" in warnings[0].getMessage()


def test_watchdog_interval() -> None:
    assert sdnotify.watchdog_interval({}) == 5.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "junk"}) == 5.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}) is None
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert sdnotify.watchdog_interval(mine) == 1.0


async def test_watchdog_ignores_outages_but_stops_for_a_stuck_sink(tmp_path: Path) -> None:
    """WATCHDOG=1 is about the bridge itself: a broker outage or a sink retrying against a
    dead backend never withholds it; a sink with work and no attempt at all does."""
    path = str(tmp_path / "w.sock")
    health, ready = Health(stall_timeout=0.3), trio.Event()
    health.require("mqtt")
    health.set("mqtt", False, "connection refused")  # the broker is down from the start
    ready.set()
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}
    with trio.fail_after(20), await bound(path) as sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: sdnotify.notify_loop(health, ready, env=env))
            got = await recv_all(sock, 0.4)
            assert got[0] == "READY=1"
            assert "STATUS=no listo: mqtt: connection refused" in got
            assert got.count("WATCHDOG=1") >= 4

            health.progress("backend", 5)  # work pending; the backend is down, the sink retries
            for _ in range(8):
                await trio.sleep(0.1)
                health.attempted("backend")
            got = await recv_all(sock, 0.05)
            assert got.count("WATCHDOG=1") >= 5
            assert any("backend: stalled" in m for m in got)  # /readyz and STATUS= say so

            # no more attempts: the sink is stuck, a restart is what helps now
            await trio.sleep(0.4)
            await recv_all(sock, 0.05)
            got = await recv_all(sock, 0.4)
            assert "WATCHDOG=1" not in got

            health.progress("backend", 0)  # it moves again
            got = await recv_all(sock, 0.3)
            assert got.count("WATCHDOG=1") >= 2
            nursery.cancel_scope.cancel()
