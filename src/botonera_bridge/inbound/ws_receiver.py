"""Incoming WhatsApp messages: a WebSocket client of the gateway (WAHA or a plain relay).

:func:`receive` keeps one connection open forever, reconnecting with backoff, and
hands every accepted message to ``on_message`` in arrival order. :func:`parse_frame`
turns one frame into an :class:`Inbound` (or ``None`` for frames that are not a
message from a person). De-duplication by message id is the inbox's job.

Frames accepted (DESIGN.md, "WhatsApp → Incoming"):

- WAHA events ``{"event": "message", "payload": {"id", "from": "573…@c.us", "body",
  "timestamp", "fromMe"}}``; ``fromMe: true`` and other events are ignored;
- plain ``{"id", "from": "+573…", "body", "timestamp"}``;
- WAHA delivery receipts ``{"event": "message.ack", "payload": {"id", "ack", "ackName"}}``
  (:func:`parse_event` turns them into :class:`~botonera_bridge.watch.receipts.Receipt`).

Each frame is handled in isolation: a malformed frame, or a failure while handing
it on, is logged once with its reason, counted in
``botonera_rejected_total{source="websocket"}``, and the next frame is read.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections.abc import Awaitable, Callable, Iterator
from functools import cache
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import msgspec
import trio

if TYPE_CHECKING:
    import trio_websocket

from ..backoff import Uniform, delays
from ..errors import ConfigError, InvalidMessage
from ..health import Health
from ..ids import as_e164, mask_phone
from ..metrics import Metrics
from ..watch.receipts import Receipt

log = logging.getLogger(__name__)

COMPONENT: Final = "websocket"
FLAT_RETRIES: Final = 3  # failures retried every reconnect_delay before backing off
MAX_DELAY: Final = 60.0  # seconds, backoff cap
STABLE_AFTER: Final = 10.0  # seconds connected that count as a healthy connection
CONNECT_TIMEOUT: Final = 10.0  # seconds for TCP + handshake
DISCONNECT_TIMEOUT: Final = 5.0  # seconds for the closing handshake
PING_INTERVAL: Final = 30.0  # seconds between keepalive pings
PONG_TIMEOUT: Final = 10.0  # seconds to wait for the pong before reconnecting
MAX_FRAME: Final = 1 << 20  # bytes; larger frames close the connection (1009)
WARN_EVERY: Final = 10  # failed attempts between repeated WARNING lines
MAX_TIMESTAMP: Final = 2**63  # numeric fields from outside must fit a signed 64-bit int
# WAHA ackName -> receipt status (ERROR is a failure; PENDING and PLAYED add nothing)
_ACK_STATUS: Final = {"SERVER": "sent", "DEVICE": "delivered", "READ": "read", "ERROR": "failed"}
_ACK_NUMBER: Final = {1: "sent", 2: "delivered", 3: "read", 4: "read", -1: "failed"}

_PERSONAL_SUFFIXES: Final = ("@c.us", "@s.whatsapp.net")
_NOT_A_PERSON: Final = ("@g.us", "@broadcast", "@newsletter")
_frame_decoder: Final = msgspec.json.Decoder(dict[str, Any])


@cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a broken connection to the gateway looks like, from connect to close.

    trio_websocket is imported on first use, by a receiver that is configured: it and
    what it imports (importlib.metadata, zipfile, csv) cost 1.3 MB of idle RSS."""
    import trio_websocket

    return (
        OSError,
        trio.BrokenResourceError,
        trio_websocket.HandshakeError,
        trio_websocket.ConnectionClosed,
    )


class Inbound(msgspec.Struct, frozen=True):
    """One WhatsApp message from a person."""

    id: str
    sender: str  # E.164, "+573001112233"
    body: str
    timestamp: int  # seconds since the epoch, as the gateway reported it


# ---------------------------------------------------------------- frame parsing


def parse_frame(data: str | bytes) -> Inbound | None:
    """Decode one WebSocket frame.

    Returns ``None`` for frames that are valid but not a message from a person
    (``fromMe``, ``session.status`` and other events, group chats). Raises
    :class:`InvalidMessage` (``reason``: ``invalid_json``, ``invalid_schema``,
    ``missing_field``, ``invalid_sender``) for malformed frames. Details never hold
    a full phone number.
    """
    return _message(_decode(data))


def parse_event(data: str | bytes) -> Inbound | Receipt | None:
    """Like :func:`parse_frame`, and also turns ``message.ack`` events into receipts."""
    obj = _decode(data)
    if obj.get("event") == "message.ack":
        return _ack(obj)
    return _message(obj)


def _ack(obj: dict[str, Any]) -> Receipt | None:
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise InvalidMessage("invalid_schema", "'payload' must be an object")
    name = payload.get("ackName")
    status = _ACK_STATUS.get(name) if isinstance(name, str) else None
    ack = payload.get("ack")
    if status is None and isinstance(ack, int) and not isinstance(ack, bool):
        status = _ACK_NUMBER.get(ack)
    if status is None:
        return None  # PENDING, PLAYED or unknown: nothing new
    message_id = _message_id(payload.get("id"))
    to = payload.get("to")
    number = ""
    if isinstance(to, str):
        try:
            number = _sender(to) or ""
        except InvalidMessage:
            number = ""
    ts = payload.get("timestamp", obj.get("timestamp"))
    try:
        seconds = _timestamp(ts) if ts is not None else 0
    except InvalidMessage:
        seconds = 0
    return Receipt(message_id=message_id, status=status, number=number, timestamp=seconds)


def _decode(data: str | bytes) -> dict[str, Any]:
    try:
        obj = _frame_decoder.decode(data)
    except UnicodeDecodeError as exc:
        raise InvalidMessage("invalid_json", f"frame is not UTF-8: {exc.reason}") from exc
    except RecursionError as exc:
        raise InvalidMessage("invalid_json", "JSON nesting too deep") from exc
    except msgspec.ValidationError as exc:
        raise InvalidMessage("invalid_schema", "frame is not a JSON object") from exc
    except msgspec.DecodeError as exc:
        raise InvalidMessage("invalid_json", str(exc)) from exc
    return obj


def _message(obj: dict[str, Any]) -> Inbound | None:
    if "event" in obj:
        event = obj["event"]
        if event != "message":
            if not isinstance(event, str):
                raise InvalidMessage("invalid_schema", "'event' must be a string")
            return None  # session.status, message.ack, message.any, …
        payload = obj.get("payload")
        if not isinstance(payload, dict):
            raise InvalidMessage("invalid_schema", "'payload' must be an object")
        if payload.get("fromMe") is True:
            return None
    else:
        payload = obj

    sender = _sender(payload.get("from"))
    if sender is None:
        return None
    return Inbound(
        id=_message_id(payload.get("id")),
        sender=sender,
        body=_body(payload),
        timestamp=_timestamp(payload.get("timestamp")),
    )


def _message_id(value: Any) -> str:
    if isinstance(value, dict):  # some WAHA engines send {"_serialized": "..."}
        value = value.get("_serialized")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidMessage("missing_field", "'id' is missing or not a string")
    if isinstance(value, int) and not -MAX_TIMESTAMP <= value < MAX_TIMESTAMP:
        raise InvalidMessage("invalid_schema", "'id' is a number out of range")
    text = str(value).strip()
    if not text or len(text) > 256:
        raise InvalidMessage("missing_field", "'id' is empty or longer than 256 characters")
    return text


def _sender(value: Any) -> str | None:
    """'573001112233@c.us' or '+573001112233' -> '+573001112233'; None for groups."""
    if not isinstance(value, str) or not value:
        raise InvalidMessage("missing_field", "'from' is missing or not a string")
    raw = value.strip()
    if raw.endswith(_NOT_A_PERSON) or raw.startswith("status@"):
        return None
    for suffix in _PERSONAL_SUFFIXES:
        if raw.endswith(suffix):
            raw = raw[: -len(suffix)].split(":", 1)[0]  # "57300…:12@s.whatsapp.net" (device)
            break
    number = as_e164(raw)
    if number is None:
        raise InvalidMessage("invalid_sender", f"'from' is not a phone number ({mask_phone(raw)})")
    return number


def _body(payload: dict[str, Any]) -> str:
    if "body" not in payload:
        raise InvalidMessage("missing_field", "'body' is missing")
    body = payload["body"]
    if body is None:  # media without caption
        return ""
    if not isinstance(body, str):
        raise InvalidMessage("invalid_schema", "'body' must be a string")
    return body


def _timestamp(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage("missing_field", "'timestamp' is missing or not a number")
    if not math.isfinite(value) or not 0 <= value < MAX_TIMESTAMP:
        raise InvalidMessage("invalid_schema", "'timestamp' must be a number in 0..2**63")
    seconds = int(value)
    if seconds > 100_000_000_000:  # milliseconds (year > 5138 in seconds)
        seconds //= 1000
    return seconds


# ---------------------------------------------------------------- reconnect policy


def reconnect_delays(
    base: float, *, cap: float = MAX_DELAY, flat: int = FLAT_RETRIES, rng: Uniform = random
) -> Iterator[float]:
    """Reconnect delays (the one schedule, :func:`..backoff.delays`): ``base`` (the
    configured ``reconnect_delay``) for the first ``flat`` failures, then growing with
    full jitter above ``base`` up to ``cap``. A fresh iterator starts over."""
    base = max(0.0, base)
    return delays(2 * max(base, 0.1), max(cap, base), floor=base, flat=flat, rng=rng)


# ---------------------------------------------------------------- the receiver


def safe_url(url: str) -> str:
    """The URL without credentials or query (WAHA puts its API key in the query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid websocket.url: {exc}", key="websocket.url") from exc
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(
            f"websocket.url must be ws:// or wss://host..., not {safe_url(url)!r}",
            key="websocket.url",
        )


async def receive(
    url: str,
    reconnect_delay: float,
    on_message: Callable[[Inbound], Awaitable[None]],
    *,
    on_receipt: Callable[[Receipt], Awaitable[None]] | None = None,
    health: Health | None = None,
    metrics: Metrics | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Receive messages (and, with ``on_receipt``, delivery receipts) forever.

    Reports ready at once (a gateway that is down must not block start-up); the
    connection state goes to ``health`` as component ``websocket``. Raises
    :class:`ConfigError` before reporting ready when ``url`` is not a ws(s) URL.
    An exception while handling one frame (in ``on_message`` too) is logged and
    counted, and the next frame is read; a bug in the session itself ends that
    connection, which is opened again with backoff: the receiver never dies.
    """
    _check_url(url)
    where = safe_url(url)
    retries = reconnect_delays(reconnect_delay)
    failures = 0
    if health is not None:
        health.set(COMPONENT, False, "connecting to gateway")
    task_status.started()
    while True:
        session = _Session(where, on_message, on_receipt, metrics)
        try:
            await session.run(url, health)
            reason = session.end_reason or "connection closed"
        except _transport_errors() as exc:
            reason = session.end_reason or _describe(exc)
        except Exception as exc:  # a bug in a session: supervised here, never fatal
            log.exception("gateway session with %s failed", where)
            _count(metrics, "internal_error")
            reason = f"internal error: {type(exc).__name__}"
        healthy = session.frames > 0 or (
            session.connected_at is not None
            and trio.current_time() - session.connected_at >= STABLE_AFTER
        )
        if healthy:
            retries, failures = reconnect_delays(reconnect_delay), 0
        failures += 1
        delay = next(retries)
        if health is not None:
            health.set(COMPONENT, False, reason)
        if session.connected_at is not None:
            log.warning("gateway %s disconnected (%s); reconnecting in %.1fs", where, reason, delay)
        elif failures == 1 or failures % WARN_EVERY == 0:
            log.warning(
                "cannot connect to gateway %s (%s), attempt %d; retrying in %.1fs",
                where,
                reason,
                failures,
                delay,
            )
        else:
            log.debug("gateway %s still unreachable (%s); retrying in %.1fs", where, reason, delay)
        await trio.sleep(delay)


def _count(metrics: Metrics | None, reason: str) -> None:
    if metrics is not None:
        metrics.rejected.labels(source=COMPONENT, reason=reason).inc()


def _describe(exc: BaseException) -> str:
    import trio_websocket

    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"rejected with HTTP {exc.status_code}"
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return "connect timed out"
    if isinstance(exc, trio_websocket.DisconnectionTimeout):
        return "close timed out"
    if isinstance(exc, trio_websocket.ConnectionClosed):
        return f"closed ({exc.reason.code if exc.reason else '?'})"
    cause = exc.__cause__ or exc
    text = str(cause) or type(cause).__name__
    return text[:200]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What one session's nursery raised, as the single exception that matters.

    A group holding ``Cancelled`` stays a group, minus transport errors (trio strips
    the ``Cancelled`` where it belongs); otherwise the first error that is not a
    transport error (a bug, e.g. in ``on_message``) wins over transport errors.
    """
    leaves = _leaves(group)
    if any(isinstance(e, trio.Cancelled) for e in leaves):
        _, rest = group.split(_transport_errors())  # a dying socket during shutdown is no news
        return rest if rest is not None else group
    bugs = [e for e in leaves if not isinstance(e, _transport_errors())]
    return (bugs or leaves)[0]


class _Session:
    """One connection: read frames until the gateway goes away."""

    def __init__(
        self,
        where: str,
        on_message: Callable[[Inbound], Awaitable[None]],
        on_receipt: Callable[[Receipt], Awaitable[None]] | None,
        metrics: Metrics | None,
    ) -> None:
        self.where = where
        self.on_message = on_message
        self.on_receipt = on_receipt
        self.metrics = metrics
        self.connected_at: float | None = None
        self.frames = 0  # well-formed frames received
        self.calls = 0  # on_message calls started
        self.busy = False  # inside on_message
        self.end_reason = ""

    async def run(self, url: str, health: Health | None) -> None:
        """Connect, read until the connection ends, close. Transport failures raise
        one of ``_transport_errors()``; the TCP stream is always closed on the way out.

        The stream is opened here rather than by ``open_websocket_url``: trio-websocket
        0.12 leaks the socket when the handshake is rejected or the peer drops the
        TCP connection without a closing handshake (one fd per reconnect attempt).
        """
        import trio_websocket

        parts = urlsplit(url)
        host = parts.hostname or ""
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = host if port in (80, 443) else f"{host}:{port}"
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        with trio.move_on_after(CONNECT_TIMEOUT) as connect_scope:
            if secure:
                stream = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=ssl.create_default_context(), https_compatible=True
                )
            else:
                stream = await trio.open_tcp_stream(host, port)
        if connect_scope.cancelled_caught:
            raise trio_websocket.ConnectionTimeout
        async with stream:
            try:
                async with trio.open_nursery() as nursery:
                    await self._session(nursery, stream, host_header, resource, health)
                    nursery.cancel_scope.cancel()  # the library's reader task
            except BaseExceptionGroup as group:
                raise _unwrap(group) from None

    async def _session(
        self,
        nursery: trio.Nursery,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        host_header: str,
        resource: str,
        health: Health | None,
    ) -> None:
        import trio_websocket

        with trio.move_on_after(CONNECT_TIMEOUT) as handshake_scope:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, host_header, resource, max_message_size=MAX_FRAME
            )
        if handshake_scope.cancelled_caught:
            raise trio_websocket.ConnectionTimeout
        self.connected_at = trio.current_time()
        if health is not None:
            health.set(COMPONENT, True)
        log.info("connected to gateway %s", self.where)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                inner.start_soon(self._keepalive, ws, scope)
                await self._read(ws)
                inner.cancel_scope.cancel()
        # A normal end: say goodbye if the socket is still open. When cancelled or
        # failing, the caller closes the TCP stream without ceremony.
        with trio.move_on_after(DISCONNECT_TIMEOUT):
            await ws.aclose()

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> None:
        import trio_websocket

        while True:
            try:
                data = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self.end_reason = _describe(exc)
                return
            try:
                msg = parse_event(data) if self.on_receipt is not None else parse_frame(data)
            except InvalidMessage as exc:
                if self.metrics is not None:
                    self.metrics.invalid_frames.inc()
                _count(self.metrics, exc.reason)
                log.warning(
                    "malformed frame from gateway %s: %s: %r", self.where, exc.reason, exc.detail
                )
                continue
            except Exception as exc:  # one frame never ends the session
                _count(self.metrics, "internal_error")
                log.warning(
                    "cannot decode a frame from gateway %s: %s", self.where, type(exc).__name__
                )
                continue
            self.frames += 1  # a well-formed frame: the gateway is healthy
            if msg is None:
                continue
            self.busy, self.calls = True, self.calls + 1
            try:
                if isinstance(msg, Receipt):
                    assert self.on_receipt is not None
                    await self.on_receipt(msg)
                else:
                    await self.on_message(msg)
            except Exception as exc:
                _count(self.metrics, "internal_error")
                # the exception text may quote the sender: type only, traceback at DEBUG
                log.error(
                    "frame from gateway %s not handled (%s); continuing with the next",
                    self.where,
                    type(exc).__name__,
                )
                log.debug("frame handling failure", exc_info=True)
            finally:
                self.busy = False

    async def _keepalive(
        self, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope
    ) -> None:
        """Detect a half-open connection: no pong within PONG_TIMEOUT ends the session.

        While ``on_message`` is running the library's one-message queue may be full,
        which holds pongs back too; such a round is inconclusive, not a failure.
        """
        while True:
            await trio.sleep(PING_INTERVAL)
            if self.busy:
                continue
            frames, calls = self.frames, self.calls
            with trio.move_on_after(PONG_TIMEOUT) as ping_scope:
                try:
                    await ws.ping()
                except _transport_errors():
                    return  # the reader sees the closed connection too
            alive = self.busy or frames != self.frames or calls != self.calls
            if ping_scope.cancelled_caught and not alive:
                self.end_reason = f"no pong within {PONG_TIMEOUT:g}s"
                scope.cancel()
                return
