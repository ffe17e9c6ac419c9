"""MQTT: paho-mqtt driven by Trio itself (no paho thread, no asyncio).

Only the blocking TCP/TLS connect runs in ``trio.to_thread``. Once connected,
three tasks drive paho's "external event loop" API on the socket:

* the reader waits ``trio.lowlevel.wait_readable(sock)`` and calls
  ``loop_read()`` (one packet per call) while packets keep coming; it never waits
  for more to make a batch: whatever arrived meanwhile is batched, nothing is delayed;
* the writer waits ``wait_writable`` while ``want_write()`` is true and calls
  ``loop_write()`` (paho also writes directly from ``ack()``/``publish()``; the
  writer only finishes what the kernel would not take at once);
* a misc task calls ``loop_misc()`` every second (keepalive PINGREQ, timeout).

``on_message`` appends to a bounded buffer that one task drains into the
caller's channel with ``await send.send()``: when the channel is full the buffer
fills (BUFFER_LIMIT messages or BUFFER_BYTES of payload), the reader stops
reading, TCP flow control stops the broker, and the broker holds the rest
(back-pressure reaches the broker; memory stays bounded). A payload over
``mqtt.max_payload`` is cut to that size in ``on_message``, its original length
and sha256 kept on the message: the whole payload is never held past paho's read.

Delivery: QoS 1, persistent session (``clean_session=False``) and paho's
``manual_ack``: a PUBACK goes out only when the caller calls :meth:`MqttClient.ack`,
in the order of those calls. Each successful connection gets a new
*generation*; a message carries the generation it arrived on and an ack for an
older generation is ignored: after a reconnect the broker redelivers every
unacknowledged message (same packet id, DUP set), so a late ack could otherwise
release the redelivered copy before the caller has it. Messages already handed
to the caller before a connection broke therefore arrive twice; downstream
de-duplicates by event id (Idempotency-Key).

Failure policy: :meth:`MqttClient.run` never raises for broker trouble. It
reconnects with capped exponential backoff and full jitter after any refusal,
loss or handshake timeout, then resubscribes. A refusal for bad credentials or
authorisation (CONNACK 4/5) or a refused subscription is logged at ERROR and
retried the same way (at ``RECONNECT_CAP``): the broker's users and ACLs can be
fixed without restarting the bridge, and ``/readyz`` says why it is not ready.
:class:`~botonera_bridge.errors.MqttError` is raised for fatal configuration
only: an unreadable TLS ``ca_file`` (by :func:`open_mqtt`) or a broker address
paho rejects (by ``run``).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Any, Final, NamedTuple

import trio
from paho.mqtt.client import (
    Client,
    ConnectFlags,
    DisconnectFlags,
    MQTTMessage,
    MQTTMessageInfo,
    error_string,
)
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .. import backoff
from ..config import MqttSettings
from ..errors import MqttError
from ..health import Health
from ..metrics import Metrics
from .topics import STATUS_TOPIC

log = logging.getLogger(__name__)

ONLINE: Final = b"online"
OFFLINE: Final = b"offline"

RECONNECT_FIRST: Final = 0.5  # seconds, ceiling of the first reconnect delay
RECONNECT_CAP: Final = 30.0  # seconds, largest reconnect delay
STABLE_AFTER: Final = 10.0  # seconds a connection must last for the backoff to start over
HANDSHAKE_TIMEOUT: Final = 10.0  # seconds for CONNACK + SUBACK + PUBACK(online), at least
GOODBYE_TIMEOUT: Final = 5.0  # seconds for the offline status + DISCONNECT on close
MISC_INTERVAL: Final = 1.0  # seconds between loop_misc() calls
BUFFER_LIMIT: Final = 256  # messages read from the socket but not yet in the channel
BUFFER_BYTES: Final = 4 << 20  # ... and their payload bytes
INTAKE_BUFFER: Final = 512  # messages in the channel from a reader to its router
READ_BATCH: Final = 64  # loop_read() calls per wake-up before yielding
READ_SLICE: Final = 0.005  # seconds of reading per wake-up before yielding
MAX_INFLIGHT: Final = 20  # our own QoS>0 publishes awaiting PUBACK
MAX_QUEUED: Final = 1000  # our publishes queued behind those; more raises MqttError

_OK: Final = MQTTErrorCode.MQTT_ERR_SUCCESS
_AUTH_REFUSED: Final = frozenset({134, 135})  # CONNACK 4 bad user/password, 5 not authorised


class MqttMessage(NamedTuple):
    """One received PUBLISH. Pass it back to :meth:`MqttClient.ack` once it is safe."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int  # the connection it arrived on (see MqttClient.ack)
    received_ns: int  # time.time_ns() when it was read from the socket
    dup: bool = False  # DUP flag: the broker is re-delivering it (we may have it already)
    length: int = -1  # the original length when ``payload`` was cut to mqtt.max_payload
    sha256: str = ""  # ... and the original's sha256


class MqttStatistics(NamedTuple):
    connected: bool
    generation: int  # successful connections so far
    buffered: int  # messages read from the socket, not yet in the channel
    received: int  # messages received in total
    acked: int  # PUBACKs sent in total
    ignored_acks: int  # acks for messages of an earlier connection


class _Outcome(NamedTuple):
    up_since: float | None  # trio time the connection became ready, None if it never did
    reason: str
    level: int  # logging level for the reason


class _SubWaiter:
    __slots__ = ("codes", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.codes: list[ReasonCode] | None = None  # None: the connection was lost


class _Attempt:
    """A blocking connect running in a worker thread, which the Trio side may abandon."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._done = False
        self._abandoned = False

    def connect(self, host: str, port: int, keepalive: int) -> MQTTErrorCode:
        """Runs in the worker thread."""
        try:
            return self._client.connect(host, port, keepalive)
        finally:
            with self._lock:
                self._done = True
                if self._abandoned:
                    self._close()

    def abandon(self) -> None:
        """Runs in the Trio thread when the connect was cancelled."""
        with self._lock:
            self._abandoned = True
            if self._done:
                self._close()

    def _close(self) -> None:
        # Nobody waits on this socket in Trio, so no notify_closing is needed.
        sock = self._client.socket()
        if sock is not None:
            sock.close()


class MqttClient:
    """A paho client driven by Trio. Made by :func:`open_mqtt`; see the module docstring."""

    #: Reconnect backoff (seconds); tests may lower them on an instance.
    reconnect_first: float = RECONNECT_FIRST
    reconnect_cap: float = RECONNECT_CAP

    def __init__(
        self,
        settings: MqttSettings,
        client: Client,
        *,
        client_id: str,
        clean_session: bool,
        status_topic: bool,
        health: Health | None,
        metrics: Metrics | None,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        #: Awaited before every connection attempt (ha.py: hold the session's lease first).
        self.gate = gate
        self._settings = settings
        self._client = client
        self._client_id = client_id
        self._clean_session = clean_session
        self._status_topic = status_topic
        self._health = health
        self._metrics = metrics
        self._addr = f"{settings.broker}:{settings.port}"
        self._handshake_timeout = max(HANDSHAKE_TIMEOUT, float(settings.keepalive))

        self._generation = 0
        self._link_up = False  # CONNACK accepted on the current socket
        self._connected = False  # ... and subscribed and status published
        self._connected_event = trio.Event()
        self._closed = False
        self._lost = trio.Event()
        self._lost_reason = ""
        self._connack: tuple[bool, ReasonCode] | None = None
        self._changed = trio.lowlevel.ParkingLot()  # any callback that changes state
        self._writable = trio.lowlevel.ParkingLot()  # paho has bytes to write
        self._have_msgs = trio.lowlevel.ParkingLot()
        self._space = trio.lowlevel.ParkingLot()
        self._buffer: collections.deque[MqttMessage] = collections.deque()
        self._buffer_bytes = 0  # payload bytes in _buffer
        self._max_payload = settings.max_payload
        # the receiver's channel while _drain runs and holds no message: on_message hands
        # a message straight to it when nothing is buffered (no hop through _drain)
        self._direct: trio.MemorySendChannel[MqttMessage] | None = None
        self._accepting = True
        self._pub_waiters: dict[int, trio.Event] = {}
        self._sub_waiters: dict[int, _SubWaiter] = {}
        self._extra: dict[str, int] = {}  # subscribe() topics, resubscribed on reconnect
        self._run_scope: trio.CancelScope | None = None
        self._run_done: trio.Event | None = None
        self._received = 0
        self._acked = 0
        self._ignored_acks = 0
        self._taken = 0  # messages of the current connection taken from the socket
        self._released = 0  # ... and passed back to ack() (any QoS); see quiesce()

        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_close = self._on_socket_close

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True while connected, subscribed and (with status_topic) announced online."""
        return self._connected

    async def wait_connected(self) -> None:
        """Return once :attr:`connected` is true (at once if it already is)."""
        while not self._connected:
            await self._connected_event.wait()

    def statistics(self) -> MqttStatistics:
        return MqttStatistics(
            connected=self._connected,
            generation=self._generation,
            buffered=len(self._buffer),
            received=self._received,
            acked=self._acked,
            ignored_acks=self._ignored_acks,
        )

    async def run(
        self,
        send: trio.MemorySendChannel[MqttMessage] | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, subscribe (when ``send`` is given) and read until cancelled.

        ``task_status.started()`` is called after the first connect whose
        subscriptions were acknowledged (SUBACK) and whose ``online`` status was
        published. After any loss or refusal: reconnect with backoff, resubscribe.
        Received messages go to ``send``, which is closed when ``run`` returns.
        With ``send=None`` nothing from ``settings.topics`` is subscribed, and
        anything that arrives anyway is acked and dropped.

        Raises MqttError only for fatal configuration (see the module docstring).
        """
        if self._closed:
            raise MqttError("the MQTT client is closed")
        if self._run_done is not None:
            raise RuntimeError("MqttClient.run() is already running")
        self._run_done = done = trio.Event()
        try:
            with trio.CancelScope() as self._run_scope:
                async with trio.open_nursery() as nursery:
                    if send is not None:
                        nursery.start_soon(self._drain, send)
                    else:
                        nursery.start_soon(self._discard)
                    await self._supervise(send is not None, task_status)
        finally:
            if send is not None:
                send.close()
            self._connected = False  # nobody drives the socket any more
            self._run_scope = None
            self._run_done = None
            done.set()

    def ack(self, msg: MqttMessage) -> None:
        """Send the PUBACK for ``msg`` now. PUBACKs go out in the order of these calls.

        Ignored (the broker will redeliver the message) when ``msg`` arrived on an
        earlier connection or there is no connection.
        """
        if msg.qos == 0:
            if msg.generation == self._generation:
                self._released += 1
            return
        if msg.generation != self._generation or not self._link_up:
            self._ignored_acks += 1
            log.debug(
                "not acking mid %d from connection %d (now %d, up=%s): it will be redelivered",
                msg.mid,
                msg.generation,
                self._generation,
                self._link_up,
            )
            return
        self._acked += 1
        self._released += 1
        if self._client.ack(msg.mid, msg.qos) == _OK:
            self._kick()
        # Otherwise paho found the socket broken and reported it via on_disconnect.

    def drop(self, reason: str) -> None:
        """Close the current connection now, without DISCONNECT; ``run`` goes on to
        reconnect (through :attr:`gate`). Unacked messages stay with the broker."""
        if self._link_up:
            log.warning("MQTT dropping the connection as %r: %s", self._client_id, reason)
            self._mark_lost(reason)

    async def quiesce(self) -> None:
        """Stop taking new messages from the socket and return once every message already
        taken was acked (or released) by the caller: the session can then be closed
        without leaving anything half-processed. Bound it with ``move_on_after``."""
        self._accepting = False
        # polled: a rare hand-over step, bounded by the caller
        while self._released < self._taken and self._link_up:  # noqa: ASYNC110
            await trio.sleep(0.05)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; for QoS 1/2 return once the broker acknowledged it.

        Raises MqttError when not connected or paho's queue is full. If the
        connection breaks while waiting, paho resends the message after the
        reconnect and this keeps waiting: bound it with ``move_on_after``.
        """
        if not self._connected:
            raise MqttError(f"cannot publish to {topic!r}: not connected to {self._addr}")
        info = self._publish_nowait(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            await trio.lowlevel.checkpoint()
            return
        event = trio.Event()
        self._pub_waiters[info.mid] = event
        try:
            if not info.is_published():
                await event.wait()
        finally:
            if self._pub_waiters.get(info.mid) is event:
                del self._pub_waiters[info.mid]

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe to one more topic (kept across reconnects); returns after SUBACK.

        Raises MqttError when not connected, when the broker refuses the
        subscription, or when the connection breaks before the SUBACK.
        """
        check_filter(topic)
        if not self._connected:
            raise MqttError(f"cannot subscribe to {topic!r}: not connected to {self._addr}")
        self._extra[topic] = qos
        codes = await self._subscribe_and_wait([(topic, qos)])
        if codes is None or codes[0].is_failure:
            self._extra.pop(topic, None)
            why = "connection lost" if codes is None else str(codes[0])
            raise MqttError(f"subscription to {topic!r} failed: {why}")

    # ------------------------------------------------------------ connection loop

    def _delays(self) -> Iterator[float]:
        return backoff.delays(self.reconnect_first, self.reconnect_cap)

    async def _supervise(self, subscribe: bool, task_status: trio.TaskStatus[None]) -> None:
        delays = self._delays()
        started = False
        while True:
            if self.gate is not None:
                await self.gate()
            outcome = await self._connection(subscribe, None if started else task_status)
            if outcome.up_since is not None:
                started = True
                if trio.current_time() - outcome.up_since >= STABLE_AFTER:
                    delays = self._delays()
            delay = next(delays)
            self._set_down(outcome.reason)
            log.log(outcome.level, "MQTT %s; reconnecting in %.2fs", outcome.reason, delay)
            await trio.sleep(delay)

    async def _connection(
        self, subscribe: bool, task_status: trio.TaskStatus[None] | None
    ) -> _Outcome:
        """One connection, from connect to loss. Cancellation leaves the socket open
        so that closing the context can still say goodbye on it."""
        s = self._settings
        self._close_socket()
        attempt = _Attempt(self._client)
        try:
            rc = await trio.to_thread.run_sync(
                attempt.connect, s.broker, s.port, s.keepalive, abandon_on_cancel=True
            )
        except trio.Cancelled:
            attempt.abandon()
            raise
        except ssl.SSLError as exc:
            return _Outcome(None, f"TLS with {self._addr} failed: {exc}", logging.ERROR)
        except OSError as exc:
            return _Outcome(None, f"cannot connect to {self._addr}: {exc}", logging.WARNING)
        except ValueError as exc:
            raise MqttError(f"invalid MQTT broker address {self._addr}: {exc}") from exc
        sock = self._client.socket()
        if rc != _OK or not isinstance(sock, socket.socket):
            self._close_socket()
            return _Outcome(
                None, f"cannot connect to {self._addr}: {error_string(rc)}", logging.WARNING
            )

        self._generation += 1
        self._lost = trio.Event()
        self._lost_reason = ""
        self._connack = None
        self._clear_buffer()
        self._accepting = True
        self._taken = self._released = 0  # counted per connection (see quiesce)
        outcome = _Outcome(None, "connection ended", logging.WARNING)
        async with trio.open_nursery() as io:
            io.start_soon(self._guarded, self._reader, sock)
            io.start_soon(self._guarded, self._writer, sock)
            io.start_soon(self._guarded, self._misc)
            failure = await self._handshake(subscribe)
            if failure is None:
                up_since = trio.current_time()
                self._set_up()
                if task_status is not None:
                    task_status.started()
                await self._lost.wait()
                outcome = _Outcome(
                    up_since, f"connection lost: {self._lost_reason}", logging.WARNING
                )
            else:
                outcome = failure
            io.cancel_scope.cancel()
        self._link_up = False
        self._close_socket()
        self._clear_buffer()  # unacked: the broker redelivers them on the next connection
        return outcome

    async def _handshake(self, subscribe: bool) -> _Outcome | None:
        """Wait for CONNACK, subscribe, announce ``online``. None when all went well."""
        with trio.move_on_after(self._handshake_timeout):
            await self._wait_for(lambda: self._connack is not None or self._lost.is_set())
            if self._connack is None:
                return self._lost_outcome("before CONNACK")
            session_present, rc = self._connack
            if rc.is_failure:
                level = logging.ERROR if rc.value in _AUTH_REFUSED else logging.WARNING
                hint = " (check mqtt.username and mqtt.password)" if rc.value == 134 else ""
                return _Outcome(None, f"broker {self._addr} refused us: {rc}{hint}", level)
            self._link_up = True
            log.info(
                "MQTT connected to %s as %r (connection %d, session present: %s)",
                self._addr,
                self._client_id,
                self._generation,
                session_present,
            )
            if not session_present and not self._clean_session and self._generation > 1:
                log.warning(
                    "MQTT broker %s had no session for %r: messages published while we"
                    " were away may be lost",
                    self._addr,
                    self._client_id,
                )
            filters = [(f, self._settings.qos) for f in self._filters()] if subscribe else []
            filters += [(t, q) for t, q in self._extra.items() if t not in dict(filters)]
            if filters:
                codes = await self._subscribe_and_wait(filters)
                if codes is None:
                    return self._lost_outcome("before SUBACK")
                refused = [f for (f, _), c in zip(filters, codes, strict=False) if c.is_failure]
                if refused:
                    return _Outcome(
                        None,
                        f"broker {self._addr} refused the subscription to {', '.join(refused)}",
                        logging.ERROR,
                    )
            if self._status_topic:
                try:
                    info = self._publish_nowait(STATUS_TOPIC, ONLINE, qos=1, retain=True)
                except MqttError as exc:  # our own queue is full: not worth a reconnect
                    log.warning("MQTT could not publish the online status: %s", exc)
                    return None
                await self._wait_for(lambda: info.is_published() or self._lost.is_set())
                if not info.is_published():
                    return self._lost_outcome("before the online status was acknowledged")
            return None
        return _Outcome(
            None,
            f"broker {self._addr} did not complete the handshake in {self._handshake_timeout:.0f}s",
            logging.WARNING,
        )

    def _lost_outcome(self, when: str) -> _Outcome:
        return _Outcome(None, f"connection lost {when}: {self._lost_reason}", logging.WARNING)

    def _filters(self) -> list[str]:
        group = self._settings.shared_group
        return [f"$share/{group}/{t}" if group else t for t in self._settings.topics]

    async def _subscribe_and_wait(self, filters: list[tuple[str, int]]) -> list[ReasonCode] | None:
        try:
            rc, mid = self._client.subscribe(filters)
        except ValueError as exc:
            raise MqttError(f"invalid subscription {filters!r}: {exc}") from exc
        self._kick()
        if rc != _OK or mid is None:
            await trio.lowlevel.checkpoint()
            return None
        waiter = self._sub_waiters[mid] = _SubWaiter()
        await waiter.event.wait()
        return waiter.codes

    def _publish_nowait(
        self, topic: str, payload: bytes, *, qos: int, retain: bool
    ) -> MQTTMessageInfo:
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise MqttError(f"cannot publish to {topic!r}: {exc}") from exc
        self._kick()
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise MqttError(f"cannot publish to {topic!r}: {MAX_QUEUED} messages already queued")
        # MQTT_ERR_NO_CONN for QoS>0: paho keeps it and sends it after the reconnect.
        if info.rc not in (_OK, MQTTErrorCode.MQTT_ERR_NO_CONN) or (qos == 0 and info.rc != _OK):
            raise MqttError(f"cannot publish to {topic!r}: {error_string(info.rc)}", rc=info.rc)
        return info

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.park()

    def _set_up(self) -> None:
        self._connected = True
        self._connected_event.set()
        if self._health is not None:
            self._health.set("mqtt", True)
        if self._metrics is not None:
            self._metrics.mqtt_connected.set(1)

    def _set_down(self, reason: str) -> None:
        self._connected = False
        if self._connected_event.is_set():
            self._connected_event = trio.Event()
        if self._health is not None:
            self._health.set("mqtt", False, reason)
        if self._metrics is not None:
            self._metrics.mqtt_connected.set(0)

    def _mark_lost(self, reason: str) -> None:
        self._link_up = False
        self._connected = False
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()
        for waiter in self._sub_waiters.values():
            waiter.event.set()  # codes stay None: lost
        self._sub_waiters.clear()
        self._changed.unpark_all()

    def _close_socket(self) -> None:
        """Close paho's socket from the Trio thread, telling Trio first."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket) and sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    # ------------------------------------------------------------------- IO tasks

    async def _guarded(self, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one IO task of a connection; an unexpected error in it (paho, a callback)
        ends that connection only: ``run`` reconnects and the broker redelivers whatever
        was not acknowledged, so nothing is lost and nothing is acked twice."""
        try:
            await task(*args)
        except Exception as exc:  # noqa: BLE001 - a bug must not end MQTT intake
            name = getattr(task, "__name__", "task").strip("_")
            log.exception("MQTT %s failed; dropping the connection", name)
            if self._metrics is not None:
                self._metrics.intake_failures.labels(task=f"mqtt {name}").inc()
            self._mark_lost(f"internal error in the {name}: {type(exc).__name__}: {exc}")

    def _is_current(self, sock: socket.socket) -> bool:
        """Paho still uses ``sock`` and it is open (paho may close it from any call)."""
        return self._client.socket() is sock and sock.fileno() >= 0

    def _kick(self) -> None:
        if self._client.want_write():
            self._writable.unpark_all()

    def _full(self) -> bool:
        return len(self._buffer) >= BUFFER_LIMIT or self._buffer_bytes >= BUFFER_BYTES

    def _take(self) -> MqttMessage:
        msg = self._buffer.popleft()
        self._buffer_bytes -= len(msg.payload)
        if not self._full():
            self._space.unpark_all()
        return msg

    def _clear_buffer(self) -> None:
        self._buffer.clear()
        self._buffer_bytes = 0
        self._space.unpark_all()

    async def _reader(self, sock: socket.socket) -> None:
        client = self._client
        try:
            while True:
                while self._full():
                    await self._space.park()
                if not self._is_current(sock):
                    return  # closed while we were not waiting on it
                if isinstance(sock, ssl.SSLSocket) and sock.pending():
                    await trio.lowlevel.checkpoint()  # decrypted bytes already buffered
                else:
                    await trio.lowlevel.wait_readable(sock)
                slice_end = time.perf_counter() + READ_SLICE
                for _ in range(READ_BATCH):
                    before = self._received
                    rc = client.loop_read()
                    if rc != _OK:
                        self._mark_lost(error_string(rc))
                        return
                    if self._received == before or self._full() or time.perf_counter() > slice_end:
                        break
                self._kick()
        except trio.ClosedResourceError:
            return  # paho closed the socket; on_disconnect said why

    async def _writer(self, sock: socket.socket) -> None:
        client = self._client
        try:
            while True:
                if not client.want_write():
                    await self._writable.park()
                    continue
                if not self._is_current(sock):
                    return
                await trio.lowlevel.wait_writable(sock)
                rc = client.loop_write()
                if rc != _OK:
                    self._mark_lost(error_string(rc))
                    return
        except trio.ClosedResourceError:
            return

    async def _misc(self) -> None:
        while True:
            await trio.sleep(MISC_INTERVAL)
            rc = self._client.loop_misc()
            if rc != _OK:
                self._mark_lost(error_string(rc))
                return
            self._kick()

    async def _drain(self, send: trio.MemorySendChannel[MqttMessage]) -> None:
        buffer = self._buffer
        try:
            while True:
                while not buffer:
                    self._direct = send
                    await self._have_msgs.park()
                self._direct = None  # holding messages: order goes through us
                msg = self._take()
                if msg.generation != self._generation:
                    continue  # from a dead connection: the broker redelivers it
                try:
                    send.send_nowait(msg)
                except trio.WouldBlock:
                    await send.send(msg)
        finally:
            self._direct = None

    async def _discard(self) -> None:
        while True:
            while not self._buffer:
                await self._have_msgs.park()
            msg = self._take()
            log.debug("dropping message on %r: this MQTT client has no receiver", msg.topic)
            self.ack(msg)

    # ------------------------------------------------------------ paho callbacks
    # Paho calls these from inside loop_read()/loop_write()/loop_misc()/ack()/...
    # in the Trio thread, except while the worker thread connects: those calls are
    # ignored (in_trio_run() is false there) and the connect's result decides.

    def _on_connect(
        self,
        _client: Client,
        _userdata: Any,
        flags: ConnectFlags,
        rc: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if trio.lowlevel.in_trio_run():
            self._connack = (flags.session_present, rc)
            self._changed.unpark_all()

    def _on_disconnect(
        self,
        _client: Client,
        _userdata: Any,
        flags: DisconnectFlags,
        rc: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if not trio.lowlevel.in_trio_run():
            return
        if flags.is_disconnect_packet_from_server:
            reason = f"broker sent DISCONNECT: {rc}"
        elif rc.value == 128:  # paho's "Unspecified error": EOF or a socket error
            reason = "connection closed by the broker or the network"
        else:
            reason = str(rc)
        self._mark_lost(reason)

    def _on_message(self, _client: Client, _userdata: Any, m: MQTTMessage) -> None:
        if not self._accepting:
            return  # closing: left unacked, the broker redelivers it next time
        try:
            topic = m.topic
        except UnicodeDecodeError:
            topic = bytes(m._topic).decode("utf-8", "replace")
        payload = m.payload
        length, digest = -1, ""
        if len(payload) > self._max_payload:  # too large: kept cut, with its length and hash
            length, digest = len(payload), hashlib.sha256(payload).hexdigest()
            payload = payload[: self._max_payload]
        m.payload = b""  # paho's copy goes now, not when the message object does
        if not isinstance(payload, bytes):
            payload = bytes(payload)
        msg = MqttMessage(
            topic, payload, m.mid, m.qos, self._generation, time.time_ns(), bool(m.dup),
            length, digest,
        )  # fmt: skip
        self._received += 1
        self._taken += 1
        direct = self._direct
        if direct is not None and not self._buffer:
            try:
                direct.send_nowait(msg)
                return
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._direct = None  # _drain finds out and ends
        self._buffer.append(msg)
        self._buffer_bytes += len(payload)
        self._have_msgs.unpark_all()

    def _on_publish(
        self, _client: Client, _userdata: Any, mid: int, _rc: ReasonCode, _props: Properties
    ) -> None:
        event = self._pub_waiters.pop(mid, None)
        if event is not None:
            event.set()
        self._changed.unpark_all()

    def _on_subscribe(
        self,
        _client: Client,
        _userdata: Any,
        mid: int,
        codes: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        waiter = self._sub_waiters.pop(mid, None)
        if waiter is not None:
            waiter.codes = codes
            waiter.event.set()

    def _on_socket_close(self, _client: Client, _userdata: Any, sock: Any) -> None:
        if trio.lowlevel.in_trio_run() and isinstance(sock, socket.socket) and sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)

    # -------------------------------------------------------------------- closing

    async def _aclose(self) -> None:
        """Stop run(), publish ``offline``, DISCONNECT, close. Shielded and bounded."""
        with trio.move_on_after(GOODBYE_TIMEOUT, shield=True):
            if self._run_scope is not None:
                self._run_scope.cancel()
            if self._run_done is not None:
                await self._run_done.wait()
            self._closed = True
            await self._goodbye()
        self._closed = True
        self._link_up = False
        self._close_socket()
        self._set_down("closed")

    async def _goodbye(self) -> None:
        sock = self._client.socket()
        if not self._link_up or not isinstance(sock, socket.socket):
            return
        self._accepting = False
        self._clear_buffer()
        async with trio.open_nursery() as io:
            io.start_soon(self._reader, sock)
            io.start_soon(self._writer, sock)
            if self._status_topic:
                try:
                    info = self._publish_nowait(STATUS_TOPIC, OFFLINE, qos=1, retain=True)
                except MqttError as exc:
                    log.warning("MQTT could not publish the offline status: %s", exc)
                else:
                    await self._wait_for(lambda: info.is_published() or self._lost.is_set())
            if not self._lost.is_set():
                self._client.disconnect()
                self._kick()
                await self._wait_for(lambda: self._lost.is_set())
                log.info("MQTT disconnected from %s", self._addr)
            io.cancel_scope.cancel()


def check_filter(topic: str) -> None:
    """Raise MqttError unless ``topic`` is a valid MQTT 3.1.1 topic filter."""
    levels = topic.split("/")
    ok = 0 < len(topic.encode()) <= 65535 and "\x00" not in topic
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            ok = False
        if "+" in level and level != "+":
            ok = False
    if not ok:
        raise MqttError(f"invalid MQTT topic filter {topic!r}")


def _make_paho(
    settings: MqttSettings, client_id: str, *, clean_session: bool, status_topic: bool
) -> Client:
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,  # else paho reconnects, blocking, inside loop_read()
        manual_ack=True,
    )
    client.enable_logger(logging.getLogger(f"{__name__}.paho"))
    if settings.username:
        client.username_pw_set(settings.username, settings.password or None)
    if settings.tls:
        try:
            client.tls_set(ca_certs=settings.ca_file or None)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise MqttError(
                f"cannot set up TLS with mqtt.ca_file={settings.ca_file!r}: {exc}"
            ) from exc
    if status_topic:
        client.will_set(STATUS_TOPIC, OFFLINE, qos=1, retain=True)
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(MAX_QUEUED)
    return client


@asynccontextmanager
async def open_mqtt(
    settings: MqttSettings,
    *,
    client_id: str | None = None,
    clean_session: bool = False,
    status_topic: bool = True,
    health: Health | None = None,
    metrics: Metrics | None = None,
    gate: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[MqttClient]:
    """An :class:`MqttClient`; start its :meth:`~MqttClient.run` in a nursery.

    ``client_id`` defaults to ``settings.client_id`` (the bridge's persistent
    session: give other tools their own). With ``status_topic`` the Last Will
    is a retained ``offline`` on :data:`STATUS_TOPIC`, ``online`` is published
    after every connect, and closing publishes ``offline`` then disconnects
    cleanly (shielded, within GOODBYE_TIMEOUT), however the block exits.
    """
    cid = settings.client_id if client_id is None else client_id
    for topic in settings.topics:
        check_filter(topic)
    paho = _make_paho(settings, cid, clean_session=clean_session, status_topic=status_topic)
    client = MqttClient(
        settings,
        paho,
        client_id=cid,
        clean_session=clean_session,
        status_topic=status_topic,
        health=health,
        metrics=metrics,
        gate=gate,
    )
    if health is not None:
        health.require("mqtt")
    if metrics is not None:
        metrics.mqtt_connected.set(0)
    try:
        yield client
    finally:
        with suppress(MqttError):
            await client._aclose()
