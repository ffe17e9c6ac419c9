"""A small keep-alive HTTP/1.1 client pool on Trio streams, speaking h11.

Why: the backend hot path POSTs one event per request. httpx costs about 430 µs
of CPU per POST, its transport httpcore about 295 µs, a bare h11 connection on a
trio stream about 78 µs. This module is that bare connection plus the few things
a pool needs: reuse, a bound on connections, connect/read timeouts, and never
reusing a connection that is out of step.

Scope, on purpose: ``http://`` only (``https://`` raises :class:`UnsupportedUrl`
so the caller can keep httpx for it), POST with a bytes body, no redirects, no
proxies, no compression. Keep httpx for everything else.

Errors (all carry ``.url``)::

    BridgeError
    └── HttpError              the request failed; nothing is known about the answer
        ├── UnsupportedUrl     not an http:// URL (raised by the constructor)
        ├── ConnectFailed      no connection could be opened: the request was never sent
        ├── HttpTimeout        connect or read (or write) took longer than configured
        └── ProtocolFailure    the server broke the connection or spoke bad HTTP

Duplicates: a POST is retried by the pool only when it is certain the request
was never written. Before a kept-alive connection is reused it is polled; one
the server already closed (EOF, RST, stray bytes) is discarded unused. If the
very first ``send`` on a reused connection fails, no byte left this process and
the request is sent once more on a fresh connection. Any failure after a byte
was written raises: the caller decides (the backend sink retries with the same
``Idempotency-Key``, which the backend de-duplicates).
"""

from __future__ import annotations

import select
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import h11
import trio

from ..errors import BridgeError

MAX_RESPONSE_BODY: Final = 4 << 20  # bytes; a larger answer is a protocol failure
RECEIVE_SIZE: Final = 65536  # bytes per read
KEEPALIVE_EXPIRY: Final = 4.0  # seconds idle after which a connection is not reused
_POLL_DEAD: Final = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


class HttpError(BridgeError):
    """Raised when a request through :class:`Http11Pool` fails; ``url`` is the full URL."""

    def __init__(self, message: str, *, url: str) -> None:
        self.url = url
        super().__init__(f"{message} ({url})")


class UnsupportedUrl(HttpError):
    """Raised by the constructor for anything but ``http://host[:port][/prefix]``."""


class ConnectFailed(HttpError):
    """Raised when no TCP connection could be opened; the request was not sent."""


class HttpTimeout(HttpError):
    """Raised when connecting, writing the request or waiting for the answer took too long.

    ``phase`` is ``"connect"`` (nothing was sent) or ``"read"`` (the request may
    have been processed).
    """

    def __init__(self, message: str, *, url: str, phase: str) -> None:
        self.phase = phase
        super().__init__(message, url=url)


class ProtocolFailure(HttpError):
    """Raised when the connection broke mid-request or the server spoke invalid HTTP."""


class _Conn:
    __slots__ = ("h11", "idle_since", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)
        self.idle_since = 0.0

    def looks_dead(self) -> bool:
        """True if the server closed (or wrote to) this idle connection: never reuse it."""
        p = select.poll()
        p.register(self.stream.socket.fileno(), select.POLLIN)
        return any(ev & _POLL_DEAD for _, ev in p.poll(0))


class _NothingSent(Exception):
    """Internal: the first write on a reused connection failed; no byte left this process."""


class Http11Pool:
    """Keep-alive HTTP/1.1 connections to one ``http://`` origin. Use :func:`open_pool`.

    At most ``max_connections`` requests run at once (others wait for a slot);
    idle connections are reused last-in first-out.
    """

    def __init__(
        self,
        url_base: str,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        u = urllib.parse.urlsplit(url_base)
        if u.scheme != "http" or not u.hostname:
            raise UnsupportedUrl(
                f"Http11Pool speaks plain http:// only, not {u.scheme or 'no scheme'!r}; "
                "use httpx for this URL",
                url=url_base,
            )
        if u.query or u.fragment:
            raise UnsupportedUrl("a base URL has no query or fragment", url=url_base)
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.host = u.hostname
        self.port = u.port or 80
        self._prefix = u.path.rstrip("/")
        hostport = u.netloc.rsplit("@", 1)[-1]  # userinfo is a secret: never in errors
        self._origin = f"http://{hostport}"
        self._host_header = hostport.encode("ascii")
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive_expiry = keepalive_expiry
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[_Conn] = []
        self._closed = False
        self.connections_opened = 0  # for tests and the benchmark

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def post(
        self, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, bytes, dict[bytes, bytes]]:
        """POST ``body`` to ``url_base + path``; return (status, body, lower-cased headers).

        Any status is returned, 5xx included: judging it is the caller's job.
        Raises :class:`HttpError` subclasses, and ``trio.ClosedResourceError``
        after :meth:`aclose`.
        """
        target = self._prefix + path
        request = h11.Request(
            method="POST",
            target=target,
            headers=[
                (b"host", self._host_header),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        )
        async with self._slots:
            conn = self._take_idle()
            if conn is not None:
                try:
                    return await self._roundtrip(conn, request, body, reused=True)
                except _NothingSent:
                    pass  # the only case a POST is sent again: it never left
            conn = await self._connect(target)
            try:
                return await self._roundtrip(conn, request, body, reused=False)
            except _NothingSent as exc:  # unreachable for a fresh connection
                raise ProtocolFailure("write failed", url=self._origin + target) from exc

    async def aclose(self) -> None:
        """Close every idle connection; later :meth:`post` calls raise ClosedResourceError."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)

    # -- internals ---------------------------------------------------------------------------

    def _take_idle(self) -> _Conn | None:
        if self._closed:
            raise trio.ClosedResourceError("the HTTP pool is closed")
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self._keepalive_expiry and not conn.looks_dead():
                return conn
            conn.stream.socket.close()  # never used again: no flush, no checkpoint needed
        return None

    async def _connect(self, target: str) -> _Conn:
        url = self._origin + target
        try:
            with trio.fail_after(self._connect_timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except trio.TooSlowError as exc:
            raise HttpTimeout(
                f"connect timed out after {self._connect_timeout:g}s", url=url, phase="connect"
            ) from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {exc}", url=url) from exc
        self.connections_opened += 1
        return _Conn(stream)

    async def _roundtrip(
        self, conn: _Conn, request: h11.Request, body: bytes, *, reused: bool
    ) -> tuple[int, bytes, dict[bytes, bytes]]:
        url = self._origin + request.target.decode("ascii", "replace")
        keep = False
        try:
            try:
                data = conn.h11.send(request) or b""
                data += conn.h11.send(h11.Data(data=body)) or b""
                data += conn.h11.send(h11.EndOfMessage()) or b""
            except h11.LocalProtocolError as exc:
                raise ProtocolFailure(f"invalid request: {exc}", url=url) from exc
            with trio.fail_after(self._read_timeout):
                await self._send(conn, data, reused=reused)
            result = await self._read_response(conn, url)
            keep = self._recycle(conn)
            return result
        except trio.TooSlowError as exc:
            raise HttpTimeout(
                f"no answer within {self._read_timeout:g}s", url=url, phase="read"
            ) from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise ProtocolFailure(f"connection broken: {exc!r}", url=url) from exc
        except h11.RemoteProtocolError as exc:
            raise ProtocolFailure(f"invalid HTTP from the server: {exc}", url=url) from exc
        finally:
            if not keep:  # failed, cancelled, or the server wants it closed: out of step
                conn.stream.socket.close()

    async def _send(self, conn: _Conn, data: bytes, *, reused: bool) -> None:
        sock = conn.stream.socket
        view = memoryview(data)
        first = True
        while view:
            try:
                n = await sock.send(view)
            except OSError as exc:
                if first and reused:
                    raise _NothingSent from exc
                raise
            first = False
            view = view[n:]

    async def _read_response(self, conn: _Conn, url: str) -> tuple[int, bytes, dict[bytes, bytes]]:
        status = 0
        headers: dict[bytes, bytes] = {}
        chunks: list[bytes] = []
        size = 0
        h = conn.h11
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(self._read_timeout):
                    data = await conn.stream.receive_some(RECEIVE_SIZE)
                h.receive_data(data)  # b"" = EOF: h11 then reports the close or an error
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    headers[name] = headers[name] + b", " + value if name in headers else value
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BODY:
                    raise ProtocolFailure(
                        f"response body larger than {MAX_RESPONSE_BODY} bytes", url=url
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks), headers
            elif isinstance(event, h11.ConnectionClosed):
                raise ProtocolFailure("server closed the connection before answering", url=url)
            # InformationalResponse (1xx): keep reading for the final answer

    def _recycle(self, conn: _Conn) -> bool:
        """Return a finished connection to the idle list if both sides allow reuse."""
        h = conn.h11
        if self._closed or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            return False
        h.start_next_cycle()
        conn.idle_since = trio.current_time()
        self._idle.append(conn)
        return True


@asynccontextmanager
async def open_pool(
    url_base: str,
    *,
    max_connections: int,
    connect_timeout: float,
    read_timeout: float,
    keepalive_expiry: float = KEEPALIVE_EXPIRY,
) -> AsyncIterator[Http11Pool]:
    """An :class:`Http11Pool` whose connections are closed when the block exits."""
    pool = Http11Pool(
        url_base,
        max_connections=max_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        keepalive_expiry=keepalive_expiry,
    )
    try:
        yield pool
    finally:
        await pool.aclose()
