"""Http11Pool against real servers: the reference backend, and a raw Trio server that
misbehaves on purpose (closes kept-alive connections, never answers, chunks, 503s).

The rule under test above all: a POST is never sent twice by the pool unless it is
certain the first copy never left (a connection found dead before use).
"""

from __future__ import annotations

import functools
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
from tests.support.backend import PROCESS_PATH, Backend
from tests.support.procs import free_port

from botonera_bridge.sinks.http11 import (
    ConnectFailed,
    HttpTimeout,
    ProtocolFailure,
    _Conn,
    open_pool,
)

CEILING = 10  # seconds any one test may take
JSON = [(b"content-type", b"application/json")]


def alert(n: int) -> bytes:
    return json.dumps(
        {"tipo_mensaje": "alarmas", "empresa": "cota", "tipo_alarma": "CRITICA", "seq": n}
    ).encode()


# --- the reference backend ----------------------------------------------------------------------


async def test_posts_reuse_one_connection(backend: Backend) -> None:
    with trio.fail_after(CEILING):
        async with open_pool(backend.url, max_connections=4, connect_timeout=2,
                             read_timeout=5) as pool:  # fmt: skip
            for n in range(5):
                status, body, headers = await pool.post(
                    PROCESS_PATH, alert(n), [*JSON, (b"idempotency-key", b"k%d" % n)]
                )
                assert status == 201, body
                assert json.loads(body)["status"] == "created"
                assert headers[b"content-type"].startswith(b"application/json")
            assert pool.connections_opened == 1
            status, body, _ = await pool.post(
                PROCESS_PATH, alert(0), [*JSON, (b"idempotency-key", b"k0")]
            )
            assert status == 200
            assert json.loads(body)["duplicate"] is True
    keys = [r["idempotency_key"] for r in backend.requests()]
    assert keys == ["k0", "k1", "k2", "k3", "k4", "k0"]  # exactly once each, in order


async def test_503_status_body_and_retry_after_are_returned(backend: Backend) -> None:
    backend.fault(status=503, count=1, retry_after=7, body={"error": "mantenimiento"})
    with trio.fail_after(CEILING):
        async with open_pool(backend.url, max_connections=1, connect_timeout=2,
                             read_timeout=5) as pool:  # fmt: skip
            status, body, headers = await pool.post(
                PROCESS_PATH, alert(1), [*JSON, (b"idempotency-key", b"a")]
            )
            assert status == 503
            assert json.loads(body) == {"error": "mantenimiento"}
            assert headers[b"retry-after"] == b"7"
            again = [*JSON, (b"idempotency-key", b"a")]
            status, _, _ = await pool.post(PROCESS_PATH, alert(1), again)
            assert status == 201


async def test_concurrent_posts_stay_within_max_connections(backend: Backend) -> None:
    results: list[int] = []
    with trio.fail_after(CEILING):
        async with open_pool(backend.url, max_connections=3, connect_timeout=2,
                             read_timeout=5) as pool:  # fmt: skip

            async def one(n: int) -> None:
                status, _, _ = await pool.post(
                    PROCESS_PATH, alert(n), [*JSON, (b"idempotency-key", b"c%d" % n)]
                )
                results.append(status)

            async with trio.open_nursery() as nursery:
                for n in range(12):
                    nursery.start_soon(one, n)
            assert pool.connections_opened <= 3
            assert pool.idle_connections == pool.connections_opened
    assert sorted(results) == [201] * 12


# --- a raw server with scripted misbehaviour ----------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Raw:
    """Each request is answered by ``reply(n, stream)`` (n counts requests, from 0)."""

    reply: Callable[[int, trio.SocketStream], Awaitable[None]]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                self.requests.append(buf[:length])
                buf = buf[length:]
                await self.reply(len(self.requests) - 1, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()


@asynccontextmanager
async def raw_server(
    reply: Callable[[int, trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[Raw]:
    raw = Raw(reply)
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, raw.handle, 0, host="127.0.0.1")
        )
        raw.port = listener.socket.getsockname()[1]
        yield raw
        nursery.cancel_scope.cancel()


async def test_server_closes_idle_keepalive_connection() -> None:
    async def reply(n: int, stream: trio.SocketStream) -> None:
        await stream.send_all(OK)
        await stream.aclose()  # no "Connection: close": the client learns from the FIN

    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(raw.url, max_connections=1, connect_timeout=2, read_timeout=2) as pool,
        ):
            assert (await pool.post("/a", b"1", []))[0] == 200
            await trio.sleep(0.05)  # the FIN arrives while the connection sits idle
            assert (await pool.post("/a", b"2", []))[0] == 200
    assert raw.requests == [b"1", b"2"]  # each sent once, the second on a fresh connection
    assert raw.connections == 2


async def test_connection_close_header_discards_the_connection() -> None:
    async def reply(n: int, stream: trio.SocketStream) -> None:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        )

    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(raw.url, max_connections=1, connect_timeout=2, read_timeout=2) as pool,
        ):
            for n in range(3):
                assert await pool.post("/a", b"%d" % n, []) == (200, b"ok", {
                    b"connection": b"close", b"content-length": b"2"})  # fmt: skip
            assert pool.idle_connections == 0
    assert raw.requests == [b"0", b"1", b"2"]
    assert pool.connections_opened == 3


async def test_close_after_request_is_an_error_not_a_silent_retry() -> None:
    async def reply(n: int, stream: trio.SocketStream) -> None:
        if n == 1:
            await stream.aclose()  # took the POST, died before answering
            raise trio.ClosedResourceError
        await stream.send_all(OK)

    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(raw.url, max_connections=1, connect_timeout=2, read_timeout=2) as pool,
        ):
            assert (await pool.post("/a", b"first", []))[0] == 200
            with pytest.raises(ProtocolFailure) as info:
                await pool.post("/a/b", b"second", [])
            assert info.value.url == f"{raw.url}/a/b"
            assert (await pool.post("/a", b"third", []))[0] == 200  # a fresh connection
    assert raw.requests == [b"first", b"second", b"third"]  # "second" exactly once


async def test_read_timeout_carries_the_url_and_drops_the_connection() -> None:
    async def reply(n: int, stream: trio.SocketStream) -> None:
        if n == 0:
            await trio.sleep_forever()
        await stream.send_all(OK)

    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(
                raw.url + "/api", max_connections=2, connect_timeout=2, read_timeout=0.2
            ) as pool,
        ):
            with pytest.raises(HttpTimeout) as info:
                await pool.post("/slow", b"x", [])
            assert info.value.phase == "read"
            assert info.value.url == f"{raw.url}/api/slow"
            assert pool.idle_connections == 0
            assert (await pool.post("/ok", b"y", []))[0] == 200
            assert pool.connections_opened == 2


async def test_connect_refused() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with trio.fail_after(CEILING):
        async with open_pool(url, max_connections=1, connect_timeout=2, read_timeout=2) as pool:
            with pytest.raises(ConnectFailed) as info:
                await pool.post("/x", b"{}", [])
    assert info.value.url == url + "/x"


async def test_chunked_response_and_informational_answer() -> None:
    async def reply(n: int, stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        await stream.send_all(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n"
            b"Retry-After: 3\r\n\r\n5\r\nhello\r\n"
        )
        await trio.sleep(0.01)
        await stream.send_all(b"6\r\n world\r\n0\r\n\r\n")

    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(raw.url, max_connections=1, connect_timeout=2, read_timeout=2) as pool,
        ):
            status, body, headers = await pool.post("/x", b"{}", JSON)
            assert (status, body, headers[b"retry-after"]) == (503, b"hello world", b"3")
            assert (await pool.post("/x", b"{}", JSON))[1] == b"hello world"
            assert pool.connections_opened == 1  # a complete chunked answer keeps it alive


async def test_garbage_answer_is_a_protocol_failure() -> None:
    async def reply(n: int, stream: trio.SocketStream) -> None:
        await stream.send_all(b"SMTP ready\r\n\r\n")

    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(raw.url, max_connections=1, connect_timeout=2, read_timeout=2) as pool,
        ):
            with pytest.raises(ProtocolFailure, match="invalid HTTP"):
                await pool.post("/x", b"{}", [])
            assert pool.idle_connections == 0


async def test_cancelled_request_never_returns_its_connection() -> None:
    gate = trio.Event()

    async def reply(n: int, stream: trio.SocketStream) -> None:
        if n == 0:
            await gate.wait()
        await stream.send_all(OK)  # the late answer to a cancelled request must not be read

    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(raw.url, max_connections=1, connect_timeout=2, read_timeout=5) as pool,
        ):
            with trio.move_on_after(0.1):
                await pool.post("/x", b"cancelled", [])
            gate.set()
            assert await pool.post("/x", b"next", []) == (200, b"ok", {b"content-length": b"2"})
            assert pool.connections_opened == 2
    assert raw.requests == [b"cancelled", b"next"]


async def test_first_write_failing_on_a_reused_connection_is_resent_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race the idle check cannot close: the server reset the connection just before
    reuse. The first send() fails, so no byte left: the POST goes once more, fresh."""

    async def reply(n: int, stream: trio.SocketStream) -> None:
        await stream.send_all(OK)
        if n == 0:  # reset (SO_LINGER 0), not FIN: the client's next send() fails at once
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()

    monkeypatch.setattr(_Conn, "looks_dead", lambda self: False)  # lose the race on purpose
    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(raw.url, max_connections=1, connect_timeout=2, read_timeout=2) as pool,
        ):
            assert (await pool.post("/a", b"1", []))[0] == 200
            await trio.sleep(0.05)  # the RST arrives
            assert (await pool.post("/a", b"2", []))[0] == 200
            assert pool.connections_opened == 2
    assert raw.requests == [b"1", b"2"]


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", "head larger"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "content-length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX", "CRLF"),
        (b"HTTP/1.1 200 OK\r\n Folded: x\r\nContent-Length: 0\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "larger than"),
        (b"HTTP/2 200\r\n\r\n", "status line"),
    ],
)
async def test_hostile_answers_are_protocol_failures(answer: bytes, why: str) -> None:
    async def reply(n: int, stream: trio.SocketStream) -> None:
        await stream.send_all(answer)

    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(raw.url, max_connections=1, connect_timeout=2, read_timeout=2) as pool,
        ):
            with pytest.raises(ProtocolFailure, match=why):
                await pool.post("/x", b"{}", [])
            assert pool.idle_connections == 0


async def test_answer_without_length_reads_to_close_and_stray_bytes_drop_the_connection() -> None:
    async def reply(n: int, stream: trio.SocketStream) -> None:
        if n == 0:
            await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            await stream.aclose()
            raise trio.ClosedResourceError
        await stream.send_all(OK + b"HTTP/1.1 200 OK\r\n")  # a stray extra answer

    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(raw.url, max_connections=1, connect_timeout=2, read_timeout=2) as pool,
        ):
            assert (await pool.post("/x", b"a", []))[:2] == (200, b"until the end")
            assert (await pool.post("/x", b"b", []))[:2] == (200, b"ok")
            assert pool.idle_connections == 0  # out of step: never reused
            assert pool.connections_opened == 2


async def test_request_headers_cannot_inject_lines() -> None:
    async def reply(n: int, stream: trio.SocketStream) -> None:
        await stream.send_all(OK)

    with trio.fail_after(CEILING):
        async with (
            raw_server(reply) as raw,
            open_pool(raw.url, max_connections=1, connect_timeout=2, read_timeout=2) as pool,
        ):
            with pytest.raises(ProtocolFailure, match="invalid request header"):
                await pool.post("/x", b"{}", [(b"idempotency-key", b"a\r\nx-evil: 1")])
            with pytest.raises(ProtocolFailure, match="invalid request header"):
                await pool.post("/x", b"{}", [(b"bad name", b"v")])
    assert raw.requests == []
