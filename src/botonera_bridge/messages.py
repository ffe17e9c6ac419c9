"""Panel messages (a msgspec tagged union on ``tipo_mensaje``) and the bridge's Event.

The Structs validate and route; the payload that is forwarded is always the
original JSON object, byte for byte, so unknown extra fields survive.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from decimal import Decimal
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


_lenient: Final = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal)
TS_MAX: Final = 2**63  # numeric timestamps must lie in 0 .. 2**63 (issue 9: range-checked)


def _tipo_of(value: Any) -> str | None:
    """``tipo_mensaje`` matched case- and space-insensitively: ' Alarmas ' -> 'alarmas'."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    tipo = "".join(value.split()).lower()
    return tipo if tipo in TIPOS else None


def _scalar_ok(value: Any) -> bool:
    """An id/seq usable as identity: a string, an integer (not a bool) or a finite number."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str | int):
        return True
    if isinstance(value, float | Decimal):
        return math.isfinite(float(value))
    return False


def _timestamp_ok(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if not _scalar_ok(value):
        return False
    try:
        return 0 <= float(value) < TS_MAX
    except OverflowError:  # an int beyond float range
        return False


def _plain_number(value: Any) -> Any:
    """A top-level JSON float as the strict decoder would have read it."""
    if isinstance(value, Decimal):
        as_float = float(value)
        return as_float if math.isfinite(as_float) else value  # out of range: refused
    return value


def _strict(payload: bytes, topic: str) -> Message | None:
    """The fast path: the tagged union. None when the payload needs the lenient path
    (it is valid JSON but does not fit the schema)."""
    try:
        return _decoder.decode(payload)
    except UnicodeDecodeError as exc:
        raise InvalidMessage("invalid_utf8", str(exc), topic=topic) from exc
    except RecursionError as exc:
        raise InvalidMessage("too_deep", "JSON nesting too deep", topic=topic) from exc
    except msgspec.ValidationError:
        return None
    except msgspec.DecodeError as exc:
        # msgspec < 0.23 raises UnicodeDecodeError, later versions DecodeError: classify here.
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise InvalidMessage("invalid_utf8", str(uexc), topic=topic) from exc
        raise InvalidMessage("invalid_json", str(exc), topic=topic) from exc


def _lenient_decode(payload: bytes, topic: str, flags: list[str]) -> Message:
    """The slow path, only for payloads the union refused: a tipo_mensaje in odd case or
    spacing, and for alarmas metadata of the wrong type (flagged, never a rejection)."""
    try:
        obj = _lenient.decode(payload)
    except RecursionError as exc:
        raise InvalidMessage("too_deep", "JSON nesting too deep", topic=topic) from exc
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidMessage("invalid_schema", f"not a JSON object: {exc}", topic=topic) from exc
    raw_tipo = obj.get("tipo_mensaje")
    tipo = _tipo_of(raw_tipo)
    if tipo is None:
        shown = raw_tipo if isinstance(raw_tipo, str) else type(raw_tipo).__name__
        raise InvalidMessage(
            "unknown_tipo", f"no usable tipo_mensaje: {str(shown)[:80]!r}", topic=topic
        )
    if raw_tipo != tipo:
        flags.append("tipo_mensaje_normalizado")
    if tipo != "alarmas":
        # other tipos stay strict: only the tag's spelling is forgiven
        top = {k: _plain_number(v) for k, v in obj.items()} | {"tipo_mensaje": tipo}
        try:
            converted: Message = msgspec.convert(top, Message)
        except msgspec.ValidationError as exc:
            raise InvalidMessage("invalid_schema", str(exc), topic=topic) from exc
        return converted
    prueba = obj.get("prueba", False)
    if not isinstance(prueba, bool):
        flags.append("prueba_invalido")
    values: dict[str, Any] = {}
    for field in ("id", "seq", "timestamp"):
        value = obj.get(field)
        ok = _timestamp_ok(value) if field == "timestamp" else _scalar_ok(value)
        if value is not None and not ok:
            flags.append(f"{field}_invalido")
            value = None
        values[field] = value
    return Alarma(
        empresa=obj.get("empresa"),
        sede=obj.get("sede"),
        dispositivo=obj.get("dispositivo"),
        prueba=prueba is True,  # only a literal true makes a send-test
        tipo_alarma=obj.get("tipo_alarma"),
        descripcion=obj.get("descripcion"),
        **values,
    )


def _ident(value: Any, field: str, topic_value: str, topic: str, lenient: bool) -> str:
    """A normalized identifier. Unusable: a rejection, except for an alarm's sede and
    dispositivo, which are flagged by the caller (returned as None) and never used in
    keys or logs: losing an alarm over a badly typed sede is worse than an unnamed sede."""
    if value is None or value == "":
        return topic_value
    try:
        return normalize_id(value, field)
    except IdentifierError as exc:
        if lenient:
            raise _Unusable from exc
        raise InvalidMessage("invalid_identifier", str(exc), topic=topic) from exc


class _Unusable(Exception):
    """An alarm's sede/dispositivo that cannot be an identifier."""


def decode(
    payload: bytes,
    topic: str,
    received_ns: int,
    max_payload: int,
    *,
    place: tuple[str, str] = ("", ""),
) -> tuple[Message, Event]:
    """Validate one MQTT payload and build its Event. Raises InvalidMessage.

    ``place``: the (empresa, sede) the transport names, used where the payload names
    none (``topics.decode_mqtt`` takes them from the panel topic)."""
    if len(payload) > max_payload:
        raise InvalidMessage(
            "too_large", f"payload of {len(payload)} bytes exceeds {max_payload}", topic=topic
        )
    flags: list[str] = []
    msg = _strict(payload, topic)
    if msg is None:
        msg = _lenient_decode(payload, topic, flags)
    is_alarm = isinstance(msg, Alarma)
    if not is_alarm:
        for field, value in (("id", msg.id), ("seq", msg.seq)):
            if value is not None and not _scalar_ok(value):
                raise InvalidMessage(
                    "invalid_schema", f"{field} out of range - at `$.{field}`", topic=topic
                )
    if msg.timestamp is not None and not _timestamp_ok(msg.timestamp):
        if not is_alarm:
            raise InvalidMessage(
                "invalid_schema",
                f"timestamp {str(msg.timestamp)[:40]} outside 0..2**63 - at `$.timestamp`",
                topic=topic,
            )
        flags.append("timestamp_invalido")
        msg.timestamp = None

    t_empresa, t_sede = place
    empresa = _ident(msg.empresa, "empresa", t_empresa, topic, False)
    try:
        sede = _ident(msg.sede, "sede", t_sede, topic, is_alarm)
    except _Unusable:
        sede = t_sede
        flags.append("sede_invalido")
    try:
        dispositivo = _ident(msg.dispositivo, "dispositivo", "", topic, is_alarm)
    except _Unusable:
        dispositivo = ""
        flags.append("dispositivo_invalido")
    tipo = type(msg).__struct_config__.tag
    assert isinstance(tipo, str)

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
        # The payload digest: a redelivery (same bytes) keeps its id, two different
        # alarms sharing a seq (a rebooted panel) or a timestamp never share one.
        digest = hashlib.blake2b(payload, digest_size=16).hexdigest()
        event_id = stable_id(empresa, sede, dispositivo, tipo, kind, str(identity), digest)
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
