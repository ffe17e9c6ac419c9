"""The send-test: a test alarm (``prueba``) whose receipt the bridge publishes on
``botonera-bridge/receipts/<event id>`` once every sink finished it.

Both ends live here: :func:`send_test_identity` (what ``botonera-bridge send-test``
publishes and which event id it waits for) and :func:`publish_receipts` (the bridge's
task that answers on MQTT).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Final

import msgspec
import trio

from .errors import MqttError
from .intake.mqtt import MqttClient
from .intake.topics import RECEIPT_TOPIC, decode_mqtt
from .messages import Event

log = logging.getLogger(__name__)

RECEIPT_PUBLISH_WAIT: Final = 10.0  # seconds for the broker's PUBACK of one receipt
RECEIPT_BUFFER: Final = 64  # finished send-tests waiting to be published
_encoder: Final = msgspec.json.Encoder()

Finished = tuple[Event, dict[str, str]]  # the event and each sink's outcome


def send_test_identity(empresa: str) -> tuple[dict[str, Any], str]:
    """The test alarm and the event id the bridge will derive from it."""
    test_id = f"prueba-{uuid.uuid4()}"
    body = {
        "tipo_mensaje": "alarmas",
        "tipo_alarma": "PRUEBA",
        "descripcion": "Prueba automática de botonera-bridge",
        "empresa": empresa,
        "prueba": True,
        "id": test_id,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # the id the bridge derives (identity + digest of these exact bytes, as send-test
    # publishes them)
    _, event = decode_mqtt(msgspec.json.encode(body), "empresas", 0, 1 << 20)
    return body, event.id


async def receipt_due(
    send: trio.MemorySendChannel[Finished] | None, event: Event, outcomes: dict[str, str]
) -> None:
    """The outbox's ``on_finished``: a send-test finished in every sink; hand it to
    :func:`publish_receipts` (``send`` is None when MQTT is off: nobody to tell)."""
    if send is not None:
        await send.send((event, outcomes))


async def publish_receipts(
    finished: trio.MemoryReceiveChannel[Finished],
    mqtt: MqttClient,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish each finished send-test's receipt (QoS 1), in order. A broker outage
    costs at most RECEIPT_PUBLISH_WAIT per receipt, and only this task waits."""
    task_status.started()
    async with finished:
        async for event, outcomes in finished:
            body = {"id": event.id, "empresa": event.empresa} | outcomes
            with trio.move_on_after(RECEIPT_PUBLISH_WAIT) as scope:
                try:
                    await mqtt.publish(RECEIPT_TOPIC + event.id, _encoder.encode(body), qos=1)
                except MqttError as exc:
                    log.warning("cannot publish send-test receipt for %s: %s", event.id, exc)
            if scope.cancelled_caught:
                log.warning("send-test receipt for %s not confirmed by the broker", event.id)
