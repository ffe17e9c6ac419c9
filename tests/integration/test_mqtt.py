"""MqttClient (paho driven by Trio) against a real private mosquitto.

The checks use an independent client (paho with its own thread) to publish and
to read retained status, so the code under test never verifies itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import trio
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from tests.support.procs import Mosquitto

from botonera_bridge.config import MqttSettings
from botonera_bridge.errors import MqttError
from botonera_bridge.health import Health
from botonera_bridge.intake.mqtt import (
    BUFFER_BYTES,
    BUFFER_LIMIT,
    READ_BATCH,
    STATUS_TOPIC,
    MqttClient,
    MqttMessage,
    MqttStatistics,
    open_mqtt,
)
from botonera_bridge.metrics import Metrics

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def mqtt_broker() -> Iterator[Mosquitto]:
    """A private mosquitto (persistence on) for one test; killed and removed afterwards."""
    broker = Mosquitto()
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


@pytest.fixture
def mqtt_broker_volatile() -> Iterator[Mosquitto]:
    """A private mosquitto without persistence: a restart forgets sessions and retained."""
    broker = Mosquitto(persistence=False)
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


def _settings(broker: Mosquitto, topic: str, **kw: object) -> MqttSettings:
    base = {"broker": "127.0.0.1", "port": broker.port, "topics": [topic], "keepalive": 10}
    return msgspec.convert(base | kw, MqttSettings)


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _paho(port: int) -> Client:
    c = Client(
        CallbackAPIVersion.VERSION2, client_id=_uid("check"), protocol=MQTTProtocolVersion.MQTTv311
    )
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port, keepalive=10)
    return c


def publish_many(port: int, topic: str, payloads: list[bytes], qos: int = 1) -> None:
    """Blocking: publish with a threaded paho client and wait for every PUBACK."""
    c = _paho(port)
    c.loop_start()
    try:
        infos = [c.publish(topic, p, qos=qos) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def retained(port: int, topic: str, timeout: float = 5.0) -> bytes | None:
    """Blocking: the retained payload on ``topic`` (None if none arrives in time)."""
    got: list[bytes] = []
    done = threading.Event()

    def on_message(_c: Client, _u: object, m: MQTTMessage) -> None:
        got.append(m.payload)
        done.set()

    c = _paho(port)
    c.on_message = on_message
    c.subscribe(topic, qos=1)
    c.loop_start()
    try:
        done.wait(timeout)
    finally:
        c.disconnect()
        c.loop_stop()
    return got[0] if got else None


async def wait_retained(port: int, topic: str, want: bytes) -> None:
    """Poll the broker (another process: no event to wait on) until ``want`` is retained."""
    while await trio.to_thread.run_sync(retained, port, topic, 0.5) != want:  # noqa: ASYNC110
        await trio.sleep(0.1)


async def receive(
    client: MqttClient, recv: trio.MemoryReceiveChannel[MqttMessage], n: int, *, ack: bool = True
) -> list[MqttMessage]:
    got: list[MqttMessage] = []
    while len(got) < n:
        msg = await recv.receive()
        got.append(msg)
        if ack:
            client.ack(msg)
    return got


async def nothing_arrives(recv: trio.MemoryReceiveChannel[MqttMessage], seconds: float) -> None:
    with trio.move_on_after(seconds):
        msg = await recv.receive()
        pytest.fail(f"unexpected message {msg!r}")


async def test_receive_1000_in_order_acked_not_redelivered(mqtt_broker: Mosquitto) -> None:
    topic = _uid("empresas")
    s = _settings(mqtt_broker, topic, client_id=_uid("bridge"))
    health, metrics = Health(60), Metrics()
    payloads = [b"%d" % i for i in range(1000)]
    with trio.fail_after(30):
        async with open_mqtt(s, health=health, metrics=metrics) as client:
            assert health.reasons() == ["mqtt: not connected yet"]
            send, recv = trio.open_memory_channel[MqttMessage](16)
            async with trio.open_nursery() as n:
                await n.start(client.run, send)
                assert client.connected
                assert health.ready
                assert metrics.mqtt_connected._value.get() == 1
                n.start_soon(
                    trio.to_thread.run_sync, publish_many, mqtt_broker.port, topic, payloads
                )
                got = await receive(client, recv, 1000)
                n.cancel_scope.cancel()
            recv.close()
        assert [m.payload for m in got] == payloads
        assert {m.topic for m in got} == {topic}
        assert {m.qos for m in got} == {1}
        assert {m.generation for m in got} == {1}
        stats = client.statistics()
        assert (stats.received, stats.acked, stats.ignored_acks) == (1000, 1000, 0)
        assert metrics.mqtt_connected._value.get() == 0
        assert not health.ready

        # Same client_id, persistent session: nothing left to redeliver.
        async with open_mqtt(s) as again:
            send, recv = trio.open_memory_channel[MqttMessage](16)
            async with trio.open_nursery() as n:
                await n.start(again.run, send)
                await nothing_arrives(recv, 1.0)
                n.cancel_scope.cancel()
            recv.close()


async def test_unacked_messages_are_redelivered_to_the_next_session(mqtt_broker: Mosquitto) -> None:
    topic = _uid("empresas")
    s = _settings(mqtt_broker, topic, client_id=_uid("bridge"))
    payloads = [b"m%d" % i for i in range(10)]
    with trio.fail_after(30):
        async with open_mqtt(s) as client:
            send, recv = trio.open_memory_channel[MqttMessage](16)
            async with trio.open_nursery() as n:
                await n.start(client.run, send)
                await trio.to_thread.run_sync(publish_many, mqtt_broker.port, topic, payloads)
                first = await receive(client, recv, 10, ack=False)
                n.cancel_scope.cancel()
            recv.close()
        assert [m.payload for m in first] == payloads

        async with open_mqtt(s) as client:
            send, recv = trio.open_memory_channel[MqttMessage](16)
            async with trio.open_nursery() as n:
                await n.start(client.run, send)
                second = await receive(client, recv, 10)
                await nothing_arrives(recv, 0.5)
                n.cancel_scope.cancel()
            recv.close()
        assert [m.payload for m in second] == payloads


async def test_ack_from_an_earlier_connection_is_ignored(mqtt_broker: Mosquitto) -> None:
    """Break the socket under paho: reconnect, redelivery, stale ack ignored, LWT + online."""
    topic = _uid("empresas")
    s = _settings(mqtt_broker, topic, client_id=_uid("bridge"))
    with trio.fail_after(30):
        async with open_mqtt(s) as client:
            client.reconnect_first = 0.05
            send, recv = trio.open_memory_channel[MqttMessage](16)
            async with trio.open_nursery() as n:
                await n.start(client.run, send)
                await trio.to_thread.run_sync(publish_many, mqtt_broker.port, topic, [b"x"])
                [old] = await receive(client, recv, 1, ack=False)
                sock = client._client.socket()
                assert isinstance(sock, socket.socket)
                sock.shutdown(socket.SHUT_RDWR)  # abrupt: no DISCONNECT
                [again] = await receive(client, recv, 1, ack=False)
                assert (again.payload, again.mid, again.generation) == (b"x", old.mid, 2)
                await client.wait_connected()
                client.ack(old)
                assert client.statistics().ignored_acks == 1
                client.ack(again)
                assert client.statistics().acked == 1
                await wait_retained(mqtt_broker.port, STATUS_TOPIC, b"online")
                n.cancel_scope.cancel()
            recv.close()
        assert await trio.to_thread.run_sync(retained, mqtt_broker.port, STATUS_TOPIC) == b"offline"

        async with open_mqtt(s) as client:
            send, recv = trio.open_memory_channel[MqttMessage](16)
            async with trio.open_nursery() as n:
                await n.start(client.run, send)
                await nothing_arrives(recv, 1.0)
                n.cancel_scope.cancel()
            recv.close()


async def test_broker_kill_and_restart_mid_stream(mqtt_broker_volatile: Mosquitto) -> None:
    broker = mqtt_broker_volatile
    topic = _uid("empresas")
    s = _settings(broker, topic, client_id=_uid("bridge"))
    health = Health(60)
    with trio.fail_after(40):
        async with open_mqtt(s, health=health) as client:
            client.reconnect_first, client.reconnect_cap = 0.1, 0.5
            send, recv = trio.open_memory_channel[MqttMessage](16)
            async with trio.open_nursery() as n:
                await n.start(client.run, send)
                before = [b"a%d" % i for i in range(200)]
                n.start_soon(trio.to_thread.run_sync, publish_many, broker.port, topic, before)
                got = await receive(client, recv, 50)
                broker.kill()  # SIGKILL, mid-stream: the publisher may lose the rest
                with trio.fail_after(10):
                    while client.connected:  # noqa: ASYNC110 - no "disconnected" event
                        await trio.sleep(0.01)
                # "connection lost", or already "cannot connect" if a retry ran in between
                reason = health.reasons()[0]
                assert reason.startswith(("mqtt: connection lost", "mqtt: cannot connect")), reason
                assert not health.ready
                await trio.sleep(0.3)  # let it fail to reconnect a few times
                broker.start()  # same port, empty: no session, no retained messages
                await client.wait_connected()
                assert health.ready
                assert client.statistics().generation >= 2
                # drain what was in flight before the kill (it may arrive again)
                while True:
                    with trio.move_on_after(0.5) as idle:
                        got.append(await recv.receive())
                        client.ack(got[-1])
                    if idle.cancelled_caught:
                        break
                # The new broker knows nothing: we must have resubscribed by ourselves.
                after = [b"b%d" % i for i in range(100)]
                await trio.to_thread.run_sync(publish_many, broker.port, topic, after)
                fresh = await receive(client, recv, 100)
                assert [m.payload for m in fresh] == after
                await wait_retained(broker.port, STATUS_TOPIC, b"online")
                n.cancel_scope.cancel()
            recv.close()
    # Before the kill, in publish order.
    assert got[:50] == sorted(got[:50], key=lambda m: int(m.payload[1:]))


LWT_CHILD = textwrap.dedent(
    """
    import sys, trio, msgspec
    from botonera_bridge.config import MqttSettings
    from botonera_bridge.intake.mqtt import open_mqtt

    async def main():
        s = msgspec.convert(
            {"broker": "127.0.0.1", "port": int(sys.argv[1]), "topics": [sys.argv[2]],
             "client_id": sys.argv[3], "keepalive": 10},
            MqttSettings,
        )
        async with open_mqtt(s) as client:
            send, recv = trio.open_memory_channel(1)
            async with trio.open_nursery() as n:
                await n.start(client.run, send)
                print("ready", flush=True)
                await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_last_will_offline_when_the_process_is_killed(mqtt_broker: Mosquitto) -> None:
    port = mqtt_broker.port
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    argv = [sys.executable, "-c", LWT_CHILD, str(port), _uid("empresas"), _uid("bridge")]
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some()
            assert line == b"ready\n"
            assert await trio.to_thread.run_sync(retained, port, STATUS_TOPIC) == b"online"
            proc.send_signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL
            await wait_retained(port, STATUS_TOPIC, b"offline")
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                if proc.stdout is not None:
                    await proc.stdout.aclose()


async def test_shared_group_splits_messages(mqtt_broker: Mosquitto) -> None:
    topic = _uid("empresas")
    payloads = [b"%d" % i for i in range(300)]
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    with trio.fail_after(30):
        async with (
            open_mqtt(_settings(mqtt_broker, topic, client_id=_uid("a"), shared_group="g")) as a,
            open_mqtt(_settings(mqtt_broker, topic, client_id=_uid("b"), shared_group="g")) as b,
        ):
            done = trio.Event()

            async def consume(
                name: str, client: MqttClient, recv: trio.MemoryReceiveChannel[MqttMessage]
            ) -> None:
                async with recv:
                    async for msg in recv:
                        client.ack(msg)
                        got[name].append(msg.payload)
                        if len(got["a"]) + len(got["b"]) == len(payloads):
                            done.set()

            async with trio.open_nursery() as n:
                for name, client in (("a", a), ("b", b)):
                    send, recv = trio.open_memory_channel[MqttMessage](16)
                    n.start_soon(consume, name, client, recv)
                    await n.start(client.run, send)
                await trio.to_thread.run_sync(publish_many, mqtt_broker.port, topic, payloads)
                await done.wait()
                await trio.sleep(0.3)  # nothing more may come
                n.cancel_scope.cancel()
    assert sorted(got["a"] + got["b"]) == sorted(payloads)  # each exactly once
    assert got["a"], "a got no share"
    assert got["b"], "b got no share"
    # each member sees its share in publish order
    assert got["a"] == sorted(got["a"], key=int)
    assert got["b"] == sorted(got["b"], key=int)


async def test_publish_waits_for_puback(mqtt_broker: Mosquitto) -> None:
    s = _settings(mqtt_broker, _uid("empresas"), client_id=_uid("bridge"))
    topic = _uid("botonera-bridge/receipts")
    async with open_mqtt(s, clean_session=True) as client:
        with pytest.raises(MqttError, match="not connected"):
            await client.publish(topic, b"early")
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                await n.start(client.run, None)
                await client.publish(topic, b"one", retain=True)
                # returned after PUBACK: the broker already holds it
                assert await trio.to_thread.run_sync(retained, mqtt_broker.port, topic) == b"one"

                os.kill(mqtt_broker.pid, signal.SIGSTOP)  # it hears us but cannot answer
                try:
                    with trio.move_on_after(0.5) as blocked:
                        await client.publish(topic, b"two", retain=True)
                    assert blocked.cancelled_caught  # no PUBACK: publish() did not return
                finally:
                    os.kill(mqtt_broker.pid, signal.SIGCONT)
                await client.publish(topic, b"three", retain=True)
                assert await trio.to_thread.run_sync(retained, mqtt_broker.port, topic) == b"three"
                n.cancel_scope.cancel()


async def _publish_unread(broker: Mosquitto, payloads: list[bytes], **kw: object) -> MqttStatistics:
    """Publish ``payloads`` at QoS 0 (no broker in-flight window to help) to a client whose
    channel (size 1) nobody reads; return its statistics once it stopped reading, after
    checking that everything still arrives, in order, once the channel is read."""
    topic = _uid("empresas")
    s = _settings(broker, topic, client_id=_uid("bridge"), **kw)
    with trio.fail_after(60):
        async with open_mqtt(s) as client:
            send, recv = trio.open_memory_channel[MqttMessage](1)
            async with trio.open_nursery() as n, recv:
                await n.start(client.run, send)
                await trio.to_thread.run_sync(publish_many, broker.port, topic, payloads, 0)
                await trio.sleep(1.0)
                stats = client.statistics()
                assert client.connected
                got = [await recv.receive() for _ in payloads]  # now read: everything comes
                assert [m.payload for m in got] == payloads
                assert client.statistics().buffered == 0
                n.cancel_scope.cancel()
    return stats


async def test_full_channel_stops_reading_the_socket(mqtt_broker: Mosquitto) -> None:
    """An unread channel bounds what the client holds (BUFFER_LIMIT messages); the rest
    waits in TCP buffers and the broker."""
    stats = await _publish_unread(mqtt_broker, [b"%05d" % i + b"." * 1000 for i in range(5000)])
    assert stats.buffered <= BUFFER_LIMIT + READ_BATCH, stats
    assert stats.received <= BUFFER_LIMIT + READ_BATCH + 2, stats


async def test_payload_bytes_stop_reading_before_the_message_count(mqtt_broker: Mosquitto) -> None:
    """Large payloads: the byte bound (BUFFER_BYTES) stops the reader long before the
    message bound (BUFFER_LIMIT)."""
    size = 100 * 1024
    payloads = [b"%05d" % i + b"." * (size - 5) for i in range(120)]  # 12 MiB
    stats = await _publish_unread(mqtt_broker, payloads, max_payload=2 * size)
    # held: the buffer up to the byte bound plus the one that crossed it, one in the
    # channel, one taken by the task waiting to put it there
    assert (stats.buffered - 1) * size < BUFFER_BYTES, stats
    assert stats.received <= BUFFER_BYTES // size + 4 < BUFFER_LIMIT, stats
