"""A small keep-alive HTTP/1.1 client pool on Trio sockets, with its own strict parser.

Why: the backend hot path POSTs one event per request. httpx costs about 430 µs
of CPU per POST, its transport httpcore about 295 µs, h11 on a trio stream about
78 µs; h11's event machinery and header validation were most of what was left
in the bridge's profile at a steady rate. This module writes the request bytes
itself and parses the answer with a small strict reader (status line, headers,
Content-Length / chunked / read-to-close bodies, 1xx skipped), on the raw socket
(write, wait readable, read: one scheduler pass per answer), plus the few things
a pool needs: reuse, a bound on connections, connect/read timeouts, and never
reusing a connection that is out of step.

Scope, on purpose: ``http://`` only (``https://`` raises :class:`UnsupportedUrl`
so the caller can keep httpx for it), POST with a bytes body, no redirects, no
proxies, no compression. Keep httpx for everything else.

The answer is hostile input: the head is bounded (``MAX_HEAD``), the body too
(``MAX_RESPONSE_BODY``); anything malformed (bad status line, header syntax,
conflicting lengths, bad chunk sizes, a transfer coding other than chunked, bytes
after the answer) is a :class:`ProtocolFailure` and the connection is dropped.
Header names and values sent are checked for CR/LF/NUL (no header injection).

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

import os
import re
import select
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import trio

from ..errors import BridgeError

MAX_RESPONSE_BODY: Final = 4 << 20  # bytes; a larger answer is a protocol failure
MAX_HEAD: Final = 65536  # bytes of status line + headers (also per chunk-size line/trailers)
RECEIVE_SIZE: Final = 65536  # bytes per read
KEEPALIVE_EXPIRY: Final = 4.0  # seconds idle after which a connection is not reused
_POLL_DEAD: Final = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\r\n\x00]*)?")
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE: Final = re.compile(rb"[\r\n\x00]")
_CHUNK_SIZE: Final = re.compile(rb"([0-9A-Fa-f]{1,8})[ \t]*(?:;[^\r\n]*)?")


class _Malformed(Exception):
    """Internal: the server's answer is not valid HTTP/1.1 (becomes ProtocolFailure)."""


class _Closed(Exception):
    """Internal: EOF before the answer was complete."""


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
    __slots__ = ("buf", "idle_since", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()  # received, not yet parsed
        self.idle_since = 0.0

    def looks_dead(self) -> bool:
        """True if the server closed (or wrote to) this idle connection: never reuse it."""
        if self.buf:
            return True  # bytes after the last answer: out of step
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
        request = self._request(target, body, headers)
        try:  # a free slot without a scheduler pass (the answer's wait is the checkpoint)
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            conn = self._take_idle()
            if conn is not None:
                try:
                    return await self._roundtrip(conn, target, request, reused=True)
                except _NothingSent:
                    pass  # the only case a POST is sent again: it never left
            conn = await self._connect(target)
            try:
                return await self._roundtrip(conn, target, request, reused=False)
            except _NothingSent as exc:  # unreachable for a fresh connection
                raise ProtocolFailure("write failed", url=self._origin + target) from exc
        finally:
            self._slots.release()

    def _request(self, target: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        url = self._origin + target
        t = target.encode("ascii", "replace")
        if not t.startswith(b"/") or _BAD_VALUE.search(t) or b" " in t:
            raise ProtocolFailure(f"invalid request target {target!r}", url=url)
        out = [b"POST ", t, b" HTTP/1.1\r\nhost: ", self._host_header,
               b"\r\ncontent-length: %d\r\n" % len(body)]  # fmt: skip
        for name, value in headers:
            if _TOKEN.fullmatch(name) is None or _BAD_VALUE.search(value):
                raise ProtocolFailure(f"invalid request header {name!r}", url=url)
            out += (name, b": ", value, b"\r\n")
        out += (b"\r\n", body)
        return b"".join(out)

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
        self, conn: _Conn, target: str, request: bytes, *, reused: bool
    ) -> tuple[int, bytes, dict[bytes, bytes]]:
        url = self._origin + target
        keep = False
        try:
            # move_on_after, not fail_after: the latter's generator wrapper costs per POST
            with trio.move_on_after(self._read_timeout) as deadline:
                fd = conn.stream.socket.fileno()
                await self._send(fd, request, reused=reused)
                status, body, headers, keep = await self._read_response(conn, fd, url)
            if deadline.cancelled_caught:
                raise HttpTimeout(
                    f"no answer within {self._read_timeout:g}s", url=url, phase="read"
                )
            if keep and not self._closed:
                conn.idle_since = trio.current_time()
                self._idle.append(conn)
            else:
                keep = False
            return status, body, headers
        except _Closed as exc:
            raise ProtocolFailure("server closed the connection before answering", url=url) from exc
        except _Malformed as exc:
            raise ProtocolFailure(f"invalid HTTP from the server: {exc}", url=url) from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise ProtocolFailure(f"connection broken: {exc!r}", url=url) from exc
        finally:
            if not keep:  # failed, cancelled, or the server wants it closed: out of step
                conn.stream.socket.close()

    # Raw fd I/O rather than trio's socket send/recv (as in queues/redis_client.py): a
    # round trip is write, wait readable, read; no failed recv before each wait.

    async def _send(self, fd: int, data: bytes, *, reused: bool) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # cancelled: send nothing
        view = memoryview(data)
        first = True
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                if first and reused:
                    raise _NothingSent from exc
                raise
            first = False
            view = view[n:]
            if view:
                await trio.lowlevel.wait_writable(fd)

    async def _fill(self, conn: _Conn, fd: int) -> None:
        """Read what is there (waiting for it); _Closed at EOF."""
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                continue
            if not data:
                raise _Closed
            conn.buf += data
            return

    async def _line(self, conn: _Conn, fd: int, start: int) -> int:
        """Index of the CRLF ending the line that starts at ``start`` (bounded length)."""
        while True:
            end = conn.buf.find(b"\r\n", start)
            if end >= 0:
                return end
            if len(conn.buf) - start > MAX_HEAD:
                raise _Malformed("line too long")
            await self._fill(conn, fd)

    async def _read_response(
        self, conn: _Conn, fd: int, url: str
    ) -> tuple[int, bytes, dict[bytes, bytes], bool]:
        """Parse one answer: (status, body, headers, whether the connection can be reused)."""
        buf = conn.buf
        while True:  # 1xx answers come before the final one
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    break
                if len(buf) > MAX_HEAD:
                    raise _Malformed(f"head larger than {MAX_HEAD} bytes")
                await self._fill(conn, fd)
            if end > MAX_HEAD:
                raise _Malformed(f"head larger than {MAX_HEAD} bytes")
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            m = _STATUS_LINE.fullmatch(lines[0])
            if m is None:
                raise _Malformed(f"bad status line {lines[0][:80]!r}")
            status = int(m.group(2))
            headers = _headers(lines[1:])
            if status == 101:
                raise _Malformed("unexpected 101 Switching Protocols")
            if status >= 200:
                break
        keep = m.group(1) == b"1" and b"close" not in _tokens(headers.get(b"connection", b""))
        te = headers.get(b"transfer-encoding")
        cl = headers.get(b"content-length")
        if status in (204, 304):
            body = b""
        elif te is not None:
            if _tokens(te) != [b"chunked"]:
                raise _Malformed(f"unsupported transfer-encoding {te[:80]!r}")
            if cl is not None:
                raise _Malformed("both transfer-encoding and content-length")
            body = await self._chunked(conn, fd)
        elif cl is not None:
            sizes = {v.strip() for v in cl.split(b",")}
            if len(sizes) != 1 or not next(iter(sizes)).isdigit():
                raise _Malformed(f"bad content-length {cl[:80]!r}")
            length = int(next(iter(sizes)))
            if length > MAX_RESPONSE_BODY:
                raise _Malformed(f"response body larger than {MAX_RESPONSE_BODY} bytes")
            while len(buf) < length:
                await self._fill(conn, fd)
            body = bytes(buf[:length])
            del buf[:length]
        else:  # no framing: the body runs to the end of the connection
            keep = False
            while True:
                if len(buf) > MAX_RESPONSE_BODY:
                    raise _Malformed(f"response body larger than {MAX_RESPONSE_BODY} bytes")
                try:
                    await self._fill(conn, fd)
                except _Closed:
                    break
            body = bytes(buf)
            buf.clear()
        if buf:
            keep = False  # bytes after the answer: out of step
        return status, body, headers, keep

    async def _chunked(self, conn: _Conn, fd: int) -> bytes:
        buf = conn.buf
        chunks: list[bytes] = []
        size = 0
        while True:
            end = await self._line(conn, fd, 0)
            m = _CHUNK_SIZE.fullmatch(bytes(buf[:end]))
            if m is None:
                raise _Malformed(f"bad chunk size line {bytes(buf[:end])[:80]!r}")
            n = int(m.group(1), 16)
            del buf[: end + 2]
            if n == 0:
                while True:  # trailers, up to the empty line
                    end = await self._line(conn, fd, 0)
                    del buf[: end + 2]
                    if end == 0:
                        return b"".join(chunks)
            size += n
            if size > MAX_RESPONSE_BODY:
                raise _Malformed(f"response body larger than {MAX_RESPONSE_BODY} bytes")
            while len(buf) < n + 2:
                await self._fill(conn, fd)
            if buf[n : n + 2] != b"\r\n":
                raise _Malformed("chunk not followed by CRLF")
            chunks.append(bytes(buf[:n]))
            del buf[: n + 2]


def _headers(lines: list[bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:  # also obs-fold (leading whitespace)
            raise _Malformed(f"bad header line {line[:80]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise _Malformed(f"bad header value for {name[:80]!r}")
        name = name.lower()
        out[name] = out[name] + b", " + value if name in out else value
    return out


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


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
