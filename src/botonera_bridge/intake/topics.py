"""Every MQTT topic the bridge names, and the panel topic's parsing (MQTT intake).

Panels publish on ``empresas/<empresa>/<sede>/...``: the empresa and sede in the
topic stand in for fields the payload leaves out (:func:`decode_mqtt`).
"""

from __future__ import annotations

from typing import Final

from ..errors import InvalidMessage
from ..ids import IdentifierError, normalize_id
from ..messages import Event, Message, decode

STATUS_TOPIC: Final = "botonera-bridge/status"  # retained online/offline (mqtt.py)
RECEIPT_TOPIC: Final = "botonera-bridge/receipts/"  # + event id: send-test receipts
COMMAND_TOPIC: Final = "comandos/{empresa}"  # SEMAFORO commands to an empresa's panels


def place(topic: str) -> tuple[str, str]:
    """The (empresa, sede) a panel topic names, normalized; "" where it names none.
    Raises InvalidMessage when a level is not a usable identifier."""
    parts = topic.split("/")
    if len(parts) < 2:
        return "", ""
    try:
        empresa = normalize_id(parts[1], "empresa") if parts[1] else ""
        sede = normalize_id(parts[2], "sede") if len(parts) >= 3 and parts[2] else ""
    except IdentifierError as exc:
        raise InvalidMessage("invalid_identifier", str(exc), topic=topic) from exc
    return empresa, sede


def decode_mqtt(
    payload: bytes, topic: str, received_ns: int, max_payload: int
) -> tuple[Message, Event]:
    """One MQTT message: the payload decoded, the topic filling in empresa and sede.
    Raises InvalidMessage; a bad payload is reported before a bad topic."""
    try:
        where = place(topic)
    except InvalidMessage:
        decode(payload, topic, received_ns, max_payload)
        raise
    return decode(payload, topic, received_ns, max_payload, place=where)
