"""Decoding at the MQTT boundary: lenient alarms, range checks, identity + payload digest."""

from __future__ import annotations

import json

import pytest

from botonera_bridge.errors import InvalidMessage
from botonera_bridge.intake.topics import decode_mqtt
from botonera_bridge.messages import Alarma
from botonera_bridge.sinks.backend import wire_body


def dec(raw: bytes | dict[str, object], topic: str = "empresas"):  # noqa: ANN201 - test helper
    payload = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return decode_mqtt(payload, topic, 0, 65536)


ALARM = {"tipo_mensaje": "alarmas", "empresa": "cota", "tipo_alarma": "CRITICA", "descripcion": "x"}

LENIENT = [
    ({"tipo_mensaje": "ALARMAS"}, "tipo_mensaje_normalizado"),
    ({"tipo_mensaje": "Alarmas "}, "tipo_mensaje_normalizado"),
    ({"prueba": None}, "prueba_invalido"),
    ({"prueba": "false"}, "prueba_invalido"),
    ({"prueba": 0}, "prueba_invalido"),
    ({"prueba": "true"}, "prueba_invalido"),
    ({"id": True}, "id_invalido"),
    ({"timestamp": {}}, "timestamp_invalido"),
    ({"timestamp": -1}, "timestamp_invalido"),
    ({"timestamp": 2**63}, "timestamp_invalido"),
    ({"seq": [7]}, "seq_invalido"),
    ({"sede": ["norte"]}, "sede_invalido"),
    ({"sede": "norte#1"}, "sede_invalido"),
    ({"dispositivo": {"a": 1}}, "dispositivo_invalido"),
]


@pytest.mark.parametrize(("extra", "flag"), LENIENT)
def test_odd_alarm_metadata_is_flagged_not_rejected(extra: dict[str, object], flag: str) -> None:
    payload = json.dumps(ALARM | extra).encode()
    msg, event = dec(payload)
    assert isinstance(msg, Alarma)
    assert event.tipo == "alarmas"
    assert flag in event.flags
    assert event.payload == payload  # forwarded unchanged
    assert event.prueba is False  # only a literal true makes a send-test
    assert "_bridge" in json.loads(wire_body(event))
    assert flag in json.loads(wire_body(event))["_bridge"]["flags"]


def test_seq_1e400_and_huge_ints_on_an_alarm() -> None:
    _, ev = dec(b'{"tipo_mensaje":"alarmas","empresa":"cota","seq":1e400}')
    assert "seq_invalido" in ev.flags
    _, ev = dec(b'{"tipo_mensaje":"alarmas","empresa":"cota","timestamp":18446744073709551616000}')
    assert "timestamp_invalido" in ev.flags
    _, ev = dec(
        b'{"tipo_mensaje":"alarmas","empresa":"cota","tipo_alarma":18446744073709551616000}'
    )
    assert ev.detail["tipo_alarma"] == "18446744073709551616000"


def test_prueba_true_is_still_a_send_test() -> None:
    assert dec(ALARM | {"prueba": True})[1].prueba is True
    assert dec(ALARM | {"tipo_mensaje": "ALARMAS", "prueba": True})[1].prueba is True


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[1, 2]", "invalid_schema"),
        (b'"alarmas"', "invalid_schema"),
        (b"{", "invalid_json"),
        (b'{"tipo_mensaje": "alarma"}', "unknown_tipo"),
        (b'{"tipo_mensaje": 5}', "unknown_tipo"),
        (b'{"empresa": "cota"}', "unknown_tipo"),
        (b'{"tipo_mensaje": "alarmas", "empresa": "co#ta"}', "invalid_identifier"),
        (b'{"tipo_mensaje": "estado", "timestamp": 18446744073709551616000}', "invalid_schema"),
        (b'{"tipo_mensaje": "estado", "timestamp": -5}', "invalid_schema"),
        (b'{"tipo_mensaje": "estado", "seq": 1e400}', "invalid_schema"),
        (b'{"tipo_mensaje": "semaforos", "id": true}', "invalid_schema"),
        (b'{"tipo_mensaje": "estado", "sede": "a#b"}', "invalid_identifier"),
    ],
)
def test_rejections(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        dec(raw)
    assert info.value.reason == reason


def test_tipo_spelling_forgiven_for_every_tipo_other_fields_stay_strict() -> None:
    msg, ev = dec(
        {"tipo_mensaje": " SEMAFOROS", "empresa": "cota", "tipo_alarma": "ROJO", "seq": 1.5}
    )
    assert ev.tipo == "semaforos"
    assert "tipo_mensaje_normalizado" in ev.flags
    assert msg.seq == 1.5


def test_identity_includes_the_payload_digest() -> None:
    a = json.dumps(
        {"tipo_mensaje": "alarmas", "empresa": "funza", "seq": 7, "descripcion": "Incendio bodega"}
    )
    b = json.dumps(
        {"tipo_mensaje": "alarmas", "empresa": "funza", "seq": 7, "descripcion": "Robo en portería"}
    )
    ida, idb = dec(a.encode())[1].id, dec(b.encode())[1].id
    assert ida != idb
    assert dec(a.encode())[1].id == ida  # a redelivery of the same bytes keeps its key
    ts = {"tipo_mensaje": "alarmas", "empresa": "madrid", "timestamp": 1700000000}
    assert dec(ts | {"descripcion": "uno"})[1].id != dec(ts | {"descripcion": "dos"})[1].id
    # no identity: a fresh UUIDv7 each time
    bare = json.dumps({"tipo_mensaje": "alarmas", "empresa": "cota"}).encode()
    assert dec(bare)[1].id != dec(bare)[1].id
    assert dec(bare)[1].id[14] == "7"


def test_backend_body_when_the_panel_sent_its_own_bridge_key() -> None:
    raw = b'{"tipo_mensaje":"alarmas","empresa":"cota","seq":1e400,"_bridge":{"x":1}} '
    _, ev = dec(raw)
    body = wire_body(ev)
    assert b"1E+400" in body
    assert json.loads(body)["_bridge"]["flags"] == [
        "seq_invalido",
        "sin_tipo_alarma",
        "sin_descripcion",
    ]
