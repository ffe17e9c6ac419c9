"""A fake WhatsApp gateway (WAHA's WebSocket event stream) for tests.

In-process, inside a trio test (real loopback socket, so no ``autojump_clock``)::

    async with open_gateway() as gw:
        ...  # point the receiver at gw.url
        await gw.wait_clients(1)
        await gw.send({"event": "message", "payload": {...}})   # dict, str or bytes
        await gw.drop_all()          # close every client's TCP connection abruptly
        gw.connections, gw.accepted  # live connections, handshakes so far

As a subprocess, for end-to-end tests of the whole bridge::

    python tests/servers/gateway.py --port 0 --control-port 0 [--host 127.0.0.1]

prints ``listening on ws://HOST:PORT/ws control http://HOST:CPORT`` once ready,
then serves a tiny HTTP control API on the control port:

- ``POST /send[?wait=SECONDS]`` — body: one JSON frame (sent as is), or several
  lines, one frame each (JSON Lines); broadcast to every connected client.
  ``wait`` waits up to SECONDS for a first client (503 if none came).
  Answers ``{"sent": clients, "frames": n}``.
- ``POST /drop`` — close every client connection abruptly (no close frame):
  ``{"dropped": n}``.
- ``GET /clients`` — ``{"clients": live, "accepted": handshakes so far}``.
- ``POST /poison?contact=DIGITS&stranger=DIGITS`` — broadcast :func:`poison_frames`
  (malformed WAHA events, then hostile numbers from a stranger, then an ESTADO from
  the contact): ``{"sent": clients, "frames": n}``.

Only loopback is meant; the gateway needs nothing but trio and trio-websocket.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

Frame = Mapping[str, Any] | str | bytes


class Gateway:
    """The server side: who is connected, and ways to talk to them or hurt them."""

    def __init__(self, host: str, path: str) -> None:
        self.host = host
        self.path = path
        self.port = 0
        self.connections: list[WebSocketConnection] = []
        self.accepted = 0  # handshakes accepted so far
        self.paths: list[str] = []  # request path of every handshake
        self.received: list[str | bytes] = []  # frames clients sent us
        self.accepting = True  # False: answer handshakes with HTTP 503
        self._change = trio.Event()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{self.path}"

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Block until ``predicate()`` holds; re-checked on every connect/disconnect."""
        while not predicate():
            await self._change.wait()

    async def wait_clients(self, n: int = 1) -> None:
        await self.wait_for(lambda: len(self.connections) >= n)

    async def wait_accepted(self, n: int) -> None:
        await self.wait_for(lambda: self.accepted >= n)

    async def send(self, frame: Frame) -> int:
        """Send one frame to every connected client; returns how many got it."""
        data: str | bytes
        if isinstance(frame, str | bytes):
            data = frame
        else:
            data = json.dumps(frame, ensure_ascii=False)
        sent = 0
        for ws in list(self.connections):
            try:
                await ws.send_message(data)
                sent += 1
            except ConnectionClosed:
                pass
        return sent

    async def drop_all(self) -> int:
        """Close every client's TCP connection without a closing handshake."""
        victims = list(self.connections)
        for ws in victims:
            stream: trio.abc.Stream = ws._stream  # noqa: SLF001 - a fault on purpose
            try:
                await stream.aclose()
            except trio.BrokenResourceError:
                pass
        await self.wait_for(lambda: not any(ws in self.connections for ws in victims))
        return len(victims)

    async def handle(self, request: WebSocketRequest) -> None:
        if not self.accepting:
            await request.reject(503, body=b"gateway not accepting")
            return
        ws = await request.accept()
        self.accepted += 1
        self.paths.append(request.path)
        self.connections.append(ws)
        self._changed()
        try:
            while True:
                self.received.append(await ws.get_message())
        except ConnectionClosed:
            pass
        finally:
            self.connections.remove(ws)
            self._changed()


@asynccontextmanager
async def open_gateway(
    host: str = "127.0.0.1", port: int = 0, path: str = "/ws"
) -> AsyncIterator[Gateway]:
    """Serve a gateway on ``host:port`` (0 = a free port) for the duration of the block."""
    gw = Gateway(host, path)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_websocket, gw.handle, host, port, None, handler_nursery=nursery)
        )
        gw.port = server.port
        try:
            yield gw
        finally:
            nursery.cancel_scope.cancel()


def poison_frames(contact: str, stranger: str, now: int) -> list[str]:
    """What a broken or hostile gateway may send (issue 9): malformed WAHA events
    (payload a string, event a list, id an object, body a number, timestamp a
    string), a stranger's messages with timestamps too large for any integer type,
    then one well-formed ESTADO from ``contact``. Digits only, no '+'."""

    def message(n: int, sender: str, **payload: Any) -> dict[str, Any]:
        base = {
            "id": f"false_{sender}@c.us_POISON{n}",
            "timestamp": now,
            "from": f"{sender}@c.us",
            "fromMe": False,
            "body": "ESTADO",
        }
        return {"event": "message", "session": "default", "payload": base | payload}

    frames: list[Any] = [
        {"event": "message", "session": "default", "payload": "not an object"},
        {"event": ["message"], "payload": {}},
        message(1, stranger, id={"unexpected": "object"}),
        message(2, stranger, body=12345),
        message(3, stranger, timestamp="1741249702"),
        message(4, stranger, timestamp=1e300),
        message(5, stranger, timestamp=18446744073709551616000),
        message(6, contact),
    ]
    return [json.dumps(f) for f in frames]


# ---------------------------------------------------------------- subprocess mode


def _frames(body: bytes) -> list[str]:
    text = body.decode("utf-8")
    try:
        json.loads(text)
    except ValueError:
        return [line for line in text.splitlines() if line.strip()]
    return [text]


async def _control(gw: Gateway, stream: trio.SocketStream) -> None:
    async with stream:
        with trio.move_on_after(10):
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
            }
            length = int(headers.get("content-length", "0"))
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                body += chunk
            status, answer = await _route(gw, method, target, body[:length])
            payload = json.dumps(answer).encode()
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Unavailable"}
            await stream.send_all(
                f"HTTP/1.1 {status} {reason.get(status, 'X')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + payload
            )


async def _route(gw: Gateway, method: str, target: str, body: bytes) -> tuple[int, Any]:
    url = urlsplit(target)
    query = parse_qs(url.query)
    if method == "POST" and url.path == "/send":
        try:
            frames = _frames(body)
        except UnicodeDecodeError:
            return 400, {"error": "body is not UTF-8"}
        wait = float(query.get("wait", ["0"])[0])
        if wait > 0:
            with trio.move_on_after(wait):
                await gw.wait_clients(1)
            if not gw.connections:
                return 503, {"error": "no client connected"}
        sent = 0
        for frame in frames:
            sent = await gw.send(frame)
        return 200, {"sent": sent, "frames": len(frames)}
    if method == "POST" and url.path == "/poison":
        frames = poison_frames(
            query.get("contact", ["573001112233"])[0],
            query.get("stranger", ["573009998877"])[0],
            int(float(query.get("now", ["0"])[0])) or int(time.time()),
        )
        sent = 0
        for frame in frames:
            sent = await gw.send(frame)
        return 200, {"sent": sent, "frames": len(frames)}
    if method == "POST" and url.path == "/drop":
        return 200, {"dropped": await gw.drop_all()}
    if method == "GET" and url.path == "/clients":
        return 200, {"clients": len(gw.connections), "accepted": gw.accepted}
    return 404, {"error": f"no route {method} {url.path}"}


async def serve(host: str, port: int, control_port: int, path: str = "/ws") -> None:
    async with open_gateway(host, port, path) as gw, trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(_control, gw), control_port, host=host)
        )
        cport = listeners[0].socket.getsockname()[1]
        print(f"listening on {gw.url} control http://{host}:{cport}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake WAHA WebSocket gateway for tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument("--path", default="/ws")
    args = parser.parse_args(argv)
    try:
        trio.run(serve, args.host, args.port, args.control_port, args.path)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
