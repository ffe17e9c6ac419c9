"""The WebSocket receiver against the fake gateway on a real loopback socket.

Real sockets, so no autojump_clock here: short real delays and a ceiling per test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import urllib.request
from functools import partial
from pathlib import Path

import pytest
import trio
from tests.servers.gateway import Gateway, open_gateway
from tests.support.procs import free_port

from botonera_bridge.errors import ConfigError
from botonera_bridge.health import Health
from botonera_bridge.inbound import ws_receiver
from botonera_bridge.inbound.ws_receiver import Inbound, receive
from botonera_bridge.metrics import Metrics

DELAY = 0.2  # reconnect_delay, seconds
CEILING = 15.0  # seconds per test

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455
GATEWAY_SCRIPT = Path(__file__).resolve().parents[1] / "servers" / "gateway.py"


def waha(n: int, body: str = "ESTADO", sender: str = "573001112233") -> dict[str, object]:
    return {
        "event": "message",
        "session": "default",
        "payload": {
            "id": f"false_{sender}@c.us_{n:04d}",
            "timestamp": 1741249700 + n,
            "from": f"{sender}@c.us",
            "fromMe": False,
            "body": body,
        },
    }


class WatchedHealth(Health):
    """Health that wakes waiters whenever a component reports."""

    def __init__(self) -> None:
        super().__init__(60.0)
        self._change = trio.Event()

    def set(self, component: str, up: bool, reason: str = "") -> None:
        super().set(component, up, reason)
        self._change.set()
        self._change = trio.Event()

    async def wait_websocket(self, up: bool) -> None:
        while self.up.get("websocket") is not up:
            await self._change.wait()


class Inbox:
    """Collects what the receiver delivers, and when."""

    def __init__(self) -> None:
        self.messages: list[Inbound] = []
        self._change = trio.Event()

    async def __call__(self, msg: Inbound) -> None:
        self.messages.append(msg)
        self._change.set()
        self._change = trio.Event()

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.messages]

    async def wait_count(self, n: int) -> None:
        while len(self.messages) < n:
            await self._change.wait()


async def start_receiver(
    nursery: trio.Nursery, url: str, inbox: Inbox, health: WatchedHealth, metrics: Metrics
) -> None:
    await nursery.start(
        lambda task_status: receive(
            url, DELAY, inbox, health=health, metrics=metrics, task_status=task_status
        )
    )


async def send_batch(gw: Gateway, first: int, count: int) -> None:
    for n in range(first, first + count):
        assert await gw.send(waha(n)) == 1


async def test_messages_arrive_in_order_and_survive_drops() -> None:
    inbox, health, metrics = Inbox(), WatchedHealth(), Metrics()
    with trio.fail_after(CEILING):
        async with open_gateway() as gw, trio.open_nursery() as nursery:
            await start_receiver(nursery, gw.url, inbox, health, metrics)
            await gw.wait_clients(1)
            await health.wait_websocket(True)
            assert gw.paths == ["/ws"]

            await send_batch(gw, 1, 5)
            await inbox.wait_count(5)
            first_ids = inbox.ids
            assert first_ids == [f"false_573001112233@c.us_{n:04d}" for n in range(1, 6)]
            assert {m.sender for m in inbox.messages} == {"+573001112233"}

            gaps = []
            for round_ in (1, 2):
                dropped_at = trio.current_time()
                assert await gw.drop_all() == 1
                await gw.wait_accepted(1 + round_)
                gaps.append(trio.current_time() - dropped_at)
                await gw.wait_clients(1)
                # the gateway redelivers the same ids after a reconnect (WAHA may)
                await send_batch(gw, 1, 5)
                await inbox.wait_count(5 * (1 + round_))
            nursery.cancel_scope.cancel()

    assert inbox.ids == first_ids * 3  # each delivered once per send, in order
    assert gw.accepted == 3
    assert all(DELAY * 0.9 <= g < DELAY + 2.0 for g in gaps), gaps
    assert metrics.invalid_frames._value.get() == 0


async def test_malformed_frames_are_counted_and_ignored() -> None:
    inbox, health, metrics = Inbox(), WatchedHealth(), Metrics()
    with trio.fail_after(CEILING):
        async with open_gateway() as gw, trio.open_nursery() as nursery:
            await start_receiver(nursery, gw.url, inbox, health, metrics)
            await gw.wait_clients(1)
            await gw.send("not json at all")
            await gw.send(b"\xff\xfe\x00")
            await gw.send({"event": "message", "payload": {"id": "x", "from": "juan"}})
            await gw.send({"event": "session.status", "payload": {"status": "WORKING"}})
            await gw.send(waha(1) | {"payload": waha(1)["payload"] | {"fromMe": True}})  # type: ignore[operator]
            await gw.send(
                {
                    "id": "plain-1",
                    "from": "+573009998877",
                    "body": "Semáforo rojo",
                    "timestamp": 1741249730,
                }
            )
            await gw.send(waha(2, body="ack"))
            await inbox.wait_count(2)
            nursery.cancel_scope.cancel()
    assert inbox.ids == ["plain-1", "false_573001112233@c.us_0002"]
    assert inbox.messages[0].sender == "+573009998877"
    assert inbox.messages[0].body == "Semáforo rojo"
    assert metrics.invalid_frames._value.get() == 3
    assert gw.accepted == 1  # garbage never cost the connection


async def test_gateway_down_at_start_does_not_block(caplog: pytest.LogCaptureFixture) -> None:
    inbox, health, metrics = Inbox(), WatchedHealth(), Metrics()
    port = free_port()
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:
            await start_receiver(
                nursery, f"ws://127.0.0.1:{port}/ws?x-api-key=s3cret", inbox, health, metrics
            )
            assert health.up["websocket"] is False  # started, not connected
            await trio.sleep(3 * DELAY)
            assert health.up["websocket"] is False
            assert health.why_down["websocket"]
            async with open_gateway(port=port) as gw:
                await gw.wait_clients(1)
                await health.wait_websocket(True)
                await gw.send(waha(1))
                await inbox.wait_count(1)
                nursery.cancel_scope.cancel()
    assert "s3cret" not in caplog.text
    assert "cannot connect to gateway ws://127.0.0.1" in caplog.text


async def test_rejected_handshake_is_retried() -> None:
    inbox, health, metrics = Inbox(), WatchedHealth(), Metrics()
    with trio.fail_after(CEILING):
        async with open_gateway() as gw, trio.open_nursery() as nursery:
            gw.accepting = False
            await start_receiver(nursery, gw.url, inbox, health, metrics)
            await trio.sleep(3 * DELAY)
            assert health.why_down["websocket"] == "rejected with HTTP 503"
            gw.accepting = True
            await gw.wait_clients(1)
            nursery.cancel_scope.cancel()


async def test_a_graceful_close_is_reconnected_too() -> None:
    inbox, health, metrics = Inbox(), WatchedHealth(), Metrics()
    with trio.fail_after(CEILING):
        async with open_gateway() as gw, trio.open_nursery() as nursery:
            await start_receiver(nursery, gw.url, inbox, health, metrics)
            await gw.wait_clients(1)
            await gw.connections[0].aclose(1001, "going away")
            await gw.wait_accepted(2)
            await gw.wait_clients(1)
            nursery.cancel_scope.cancel()


async def test_a_failing_frame_is_isolated(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 9: an exception while handling one frame is logged and counted; the
    connection stays up and the next frame is handled (it used to end the process)."""

    class Bug(Exception):
        pass

    inbox, metrics = Inbox(), Metrics()

    async def sometimes_broken(msg: Inbound) -> None:
        if msg.id.endswith("_0001"):
            raise Bug("+573001112233 inside the text")
        await inbox(msg)

    with trio.fail_after(CEILING):
        async with open_gateway() as gw, trio.open_nursery() as nursery:
            nursery.start_soon(partial(receive, gw.url, DELAY, sometimes_broken, metrics=metrics))
            await gw.wait_clients(1)
            await gw.send(waha(1))
            await gw.send(waha(2))
            await inbox.wait_count(1)
            assert inbox.ids[0].endswith("_0002")
            assert gw.accepted == 1  # the same connection
            nursery.cancel_scope.cancel()
    rejected = metrics.rejected.labels(source="websocket", reason="internal_error")
    assert rejected._value.get() == 1
    assert "not handled (Bug)" in caplog.text
    assert "573001112233" not in caplog.text


@pytest.mark.parametrize("url", ["http://localhost:8080/ws", "localhost:8080", "ws://"])
async def test_bad_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"websocket\.url"):
        await receive(url, DELAY, Inbox())


def test_gateway_as_a_subprocess() -> None:
    """`python tests/servers/gateway.py` with its HTTP control API."""
    with subprocess.Popen(
        [sys.executable, str(GATEWAY_SCRIPT), "--port", "0", "--control-port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            run_subprocess_scenario(proc)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def run_subprocess_scenario(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on ws://127.0.0.1:"), line
    ws_url, control = line.split()[2], line.split()[4]
    assert control.startswith("http://127.0.0.1:")

    def call(method: str, path: str, body: bytes | None = None) -> dict[str, int]:
        req = urllib.request.Request(control + path, data=body, method=method)  # noqa: S310
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback only
            answer: dict[str, int] = json.loads(resp.read())
            return answer

    async def acall(method: str, path: str, body: bytes | None = None) -> dict[str, int]:
        return await trio.to_thread.run_sync(call, method, path, body)

    assert call("GET", "/clients") == {"clients": 0, "accepted": 0}
    inbox = Inbox()

    async def scenario() -> None:
        with trio.fail_after(CEILING):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive, ws_url, DELAY, inbox)
                two = "\n".join(json.dumps(waha(n)) for n in (1, 2)).encode()  # JSON Lines
                assert await acall("POST", "/send?wait=5", two) == {"sent": 1, "frames": 2}
                await inbox.wait_count(2)
                assert await acall("GET", "/clients") == {"clients": 1, "accepted": 1}
                assert await acall("POST", "/drop") == {"dropped": 1}
                one = json.dumps(waha(3)).encode()
                assert await acall("POST", "/send?wait=5", one) == {"sent": 1, "frames": 1}
                await inbox.wait_count(3)
                assert (await acall("GET", "/clients"))["accepted"] == 2
                nursery.cancel_scope.cancel()

    trio.run(scenario)
    assert [m.id[-4:] for m in inbox.messages] == ["0001", "0002", "0003"]


async def test_a_silent_gateway_is_detected_by_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that completed the handshake and then went silent (half-open TCP)."""
    monkeypatch.setattr(ws_receiver, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(ws_receiver, "PONG_TIMEOUT", 0.2)
    monkeypatch.setattr(ws_receiver, "DISCONNECT_TIMEOUT", 0.2)
    handshakes = 0
    changed = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        nonlocal handshakes, changed
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(4096)
            key = next(
                line.split(b":", 1)[1].strip()
                for line in request.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())  # noqa: S324
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            handshakes += 1
            changed.set()
            changed = trio.Event()
            await trio.sleep_forever()  # never read, never answer a ping

    inbox, health, metrics = Inbox(), WatchedHealth(), Metrics()
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            await start_receiver(nursery, f"ws://127.0.0.1:{port}/ws", inbox, health, metrics)
            await health.wait_websocket(True)
            await health.wait_websocket(False)
            assert health.why_down["websocket"] == "no pong within 0.2s"
            while handshakes < 2:  # and it reconnects
                await changed.wait()
            nursery.cancel_scope.cancel()
