"""Panel messages (a msgspec tagged union on ``tipo_mensaje``) and the bridge's Event.

The Structs validate and route; the payload that is forwarded is always the
original JSON object, byte for byte, so unknown extra fields survive.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

import msgspec

from .errors import InvalidMessage
from .ids import IdentifierError, normalize_id, stable_id, uuid7

TIPOS: Final = ("semaforos", "alarmas", "estado", "configuracion", "heartbeat")
Scalar = str | int | float


class PanelMessage(msgspec.Struct, tag_field="tipo_mensaje", kw_only=True):
    empresa: Any = None
    sede: Any = None
    dispositivo: Any = None
    id: Scalar | None = None
    seq: Scalar | None = None
    timestamp: Scalar | None = None
    prueba: bool = False


class Semaforo(PanelMessage, tag="semaforos"):
    tipo_alarma: Any = None


class Alarma(PanelMessage, tag="alarmas"):
    tipo_alarma: Any = None
    descripcion: Any = None


class Estado(PanelMessage, tag="estado"):
    status: Any = None


class Configuracion(PanelMessage, tag="configuracion"):
    parametros: Any = None


class Heartbeat(PanelMessage, tag="heartbeat"):
    pass


Message = Semaforo | Alarma | Estado | Configuracion | Heartbeat
_decoder: Final = msgspec.json.Decoder(Message)
_probe: Final = msgspec.json.Decoder(dict[str, Any])


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One message plus the bridge's metadata; what the outbox stores."""

    id: str
    tipo: str
    empresa: str  # "" when unknown
    sede: str
    dispositivo: str
    topic: str
    recibido_en: str  # RFC 3339 UTC
    origen: str  # mqtt | watchdog | whatsapp
    payload: bytes  # the original JSON object
    flags: tuple[str, ...] = ()
    prueba: bool = False
    received_ns: int = 0  # wall clock, for latency metrics
    detail: dict[str, str] = {}  # human fields for WhatsApp texts (tipo_alarma, descripcion, …)

    @property
    def lane(self) -> str:
        """Per-empresa ordering key."""
        return self.empresa or "-"

    @property
    def device_key(self) -> str:
        return f"{self.empresa or '-'}/{self.sede or '-'}/{self.dispositivo or '-'}"

    def backend_body(self) -> bytes:
        """The original object with ``_bridge`` appended, spliced without re-encoding."""
        bridge = {"id": self.id, "topic": self.topic, "recibido_en": self.recibido_en}
        bridge["origen"] = self.origen
        meta: dict[str, Any] = dict(bridge)
        if self.flags:
            meta["flags"] = list(self.flags)
        tail = _encoder.encode(meta)
        body = self.payload.rstrip()
        if body.endswith(b"}") and b'"_bridge"' not in body:
            head = body[:-1].rstrip()
            sep = b"" if head.endswith(b"{") else b","
            return head + sep + b'"_bridge":' + tail + b"}"
        obj = _probe.decode(self.payload)
        obj["_bridge"] = meta
        return _encoder.encode(obj)


_encoder: Final = msgspec.json.Encoder()
_event_codec: Final = msgspec.msgpack.Encoder()
_event_decoder: Final = msgspec.msgpack.Decoder(Event)


def encode_event(event: Event) -> bytes:
    return _event_codec.encode(event)


def decode_event(data: bytes) -> Event:
    return _event_decoder.decode(data)


def now_rfc3339(ns: int) -> str:
    return (
        dt.datetime.fromtimestamp(ns / 1e9, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else _encoder.encode(value).decode()


def _ident(value: Any, field: str, topic_value: str, topic: str) -> str:
    if value is None or value == "":
        return topic_value
    try:
        return normalize_id(value, field)
    except IdentifierError as exc:
        raise InvalidMessage("invalid_identifier", str(exc), topic=topic) from exc


def decode(payload: bytes, topic: str, received_ns: int, max_payload: int) -> tuple[Message, Event]:
    """Validate one MQTT payload and build its Event. Raises InvalidMessage."""
    if len(payload) > max_payload:
        raise InvalidMessage(
            "too_large", f"payload of {len(payload)} bytes exceeds {max_payload}", topic=topic
        )
    try:
        msg = _decoder.decode(payload)
    except UnicodeDecodeError as exc:
        raise InvalidMessage("invalid_utf8", str(exc), topic=topic) from exc
    except RecursionError as exc:
        raise InvalidMessage("too_deep", "JSON nesting too deep", topic=topic) from exc
    except msgspec.ValidationError as exc:
        text = str(exc)
        reason = (
            "unknown_tipo"
            if "$.tipo_mensaje" in text or "tipo_mensaje" in text
            else "invalid_schema"
        )
        raise InvalidMessage(reason, text, topic=topic) from exc
    except msgspec.DecodeError as exc:
        # msgspec < 0.23 raises UnicodeDecodeError, later versions DecodeError: classify here.
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise InvalidMessage("invalid_utf8", str(uexc), topic=topic) from exc
        raise InvalidMessage("invalid_json", str(exc), topic=topic) from exc

    parts = topic.split("/")
    t_empresa = t_sede = ""
    if len(parts) >= 2:
        try:
            t_empresa = normalize_id(parts[1], "empresa")
            t_sede = normalize_id(parts[2], "sede") if len(parts) >= 3 else ""
        except IdentifierError as exc:
            raise InvalidMessage("invalid_identifier", str(exc), topic=topic) from exc
    empresa = _ident(msg.empresa, "empresa", t_empresa, topic)
    sede = _ident(msg.sede, "sede", t_sede, topic)
    dispositivo = _ident(msg.dispositivo, "dispositivo", "", topic)
    tipo = type(msg).__struct_config__.tag
    assert isinstance(tipo, str)

    flags: list[str] = []
    if not empresa:
        flags.append("sin_empresa")
    detail: dict[str, str] = {}
    match msg:
        case Alarma(tipo_alarma=ta, descripcion=desc):
            detail = {"tipo_alarma": _text(ta), "descripcion": _text(desc)}
            if ta is None:
                flags.append("sin_tipo_alarma")
            if desc is None:
                flags.append("sin_descripcion")
        case Semaforo(tipo_alarma=ta):
            detail = {"tipo_alarma": _text(ta)}
            if ta is None:
                flags.append("sin_tipo_alarma")
        case Estado(status=st):
            detail = {"status": _text(st)}
        case _:
            pass

    identity = msg.id if msg.id is not None else msg.seq
    kind = "id" if msg.id is not None else "seq"
    if identity is None and msg.timestamp is not None:
        identity, kind = msg.timestamp, "ts"
    if identity is not None:
        event_id = stable_id(empresa, sede, dispositivo, tipo, kind, str(identity))
    else:
        event_id = uuid7()
    return msg, Event(
        id=event_id,
        tipo=tipo,
        empresa=empresa,
        sede=sede,
        dispositivo=dispositivo,
        topic=topic,
        recibido_en=now_rfc3339(received_ns),
        origen="mqtt",
        payload=payload,
        flags=tuple(flags),
        prueba=msg.prueba,
        received_ns=received_ns,
        detail=detail,
    )


def synthetic(
    obj: dict[str, Any],
    *,
    origen: str,
    topic: str,
    received_ns: int,
    empresa: str = "",
    sede: str = "",
    dispositivo: str = "",
    event_id: str | None = None,
    detail: dict[str, str] | None = None,
) -> Event:
    """An event the bridge itself creates (watchdog offline/online, WhatsApp acuse)."""
    return Event(
        id=event_id or uuid7(),
        tipo=str(obj["tipo_mensaje"]),
        empresa=empresa,
        sede=sede,
        dispositivo=dispositivo,
        topic=topic,
        recibido_en=now_rfc3339(received_ns),
        origen=origen,
        payload=_encoder.encode(obj),
        received_ns=received_ns,
        detail=detail or {},
    )
