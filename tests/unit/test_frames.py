"""Gateway frames -> Inbound (ws_receiver.parse_frame) and the reconnect schedule."""

from __future__ import annotations

import json
import random

import pytest

from botonera_bridge.errors import InvalidMessage
from botonera_bridge.inbound.ws_receiver import Inbound, parse_frame, reconnect_delays, safe_url

# /work/shared/samples/waha-events.jsonl, verbatim, one line each
SAMPLES = [
    '{"id": "evt_01JAAAAAAAAAAAAAAAAAAAAAAA", "timestamp": 1741249702485, "event": "message", "session": "default", "me": {"id": "573000000000@c.us", "pushName": "Bridge"}, "payload": {"id": "false_573001112233@c.us_AAAA1", "timestamp": 1741249702, "from": "573001112233@c.us", "fromMe": false, "to": "573000000000@c.us", "body": "ESTADO", "hasMedia": false, "ack": 1}, "engine": "WEBJS"}',  # noqa: E501
    '{"id": "evt_01JAAAAAAAAAAAAAAAAAAAAAAB", "timestamp": 1741249710000, "event": "message", "session": "default", "payload": {"id": "false_573001112233@c.us_AAAA2", "timestamp": 1741249710, "from": "573001112233@c.us", "fromMe": false, "body": "ack", "hasMedia": false}}',  # noqa: E501
    '{"id": "evt_01JAAAAAAAAAAAAAAAAAAAAAAC", "timestamp": 1741249720000, "event": "session.status", "session": "default", "payload": {"status": "WORKING"}}',  # noqa: E501
    '{"id": "false_573009998877@c.us_BBBB1", "from": "+573009998877", "body": "Semáforo rojo", "timestamp": 1741249730}',  # noqa: E501
]

EXPECTED = [
    Inbound("false_573001112233@c.us_AAAA1", "+573001112233", "ESTADO", 1741249702),
    Inbound("false_573001112233@c.us_AAAA2", "+573001112233", "ack", 1741249710),
    None,
    Inbound("false_573009998877@c.us_BBBB1", "+573009998877", "Semáforo rojo", 1741249730),
]


def waha(**payload: object) -> str:
    base: dict[str, object] = {
        "id": "m1",
        "from": "573001112233@c.us",
        "fromMe": False,
        "body": "hola",
        "timestamp": 1741249702,
    }
    base.update(payload)
    return json.dumps({"event": "message", "session": "default", "payload": base})


@pytest.mark.parametrize(("line", "expected"), list(zip(SAMPLES, EXPECTED, strict=True)))
def test_every_sample_line(line: str, expected: Inbound | None) -> None:
    assert parse_frame(line) == expected
    assert parse_frame(line.encode()) == expected  # binary frames too


def test_from_me_is_ignored() -> None:
    assert parse_frame(waha(fromMe=True)) is None


@pytest.mark.parametrize("event", ["message.ack", "message.any", "session.status", "presence"])
def test_other_events_are_ignored(event: str) -> None:
    frame = json.loads(waha())
    frame["event"] = event
    assert parse_frame(json.dumps(frame)) is None


@pytest.mark.parametrize(
    "sender", ["120363000000000000@g.us", "status@broadcast", "12036300000@newsletter"]
)
def test_chats_that_are_not_a_person_are_ignored(sender: str) -> None:
    assert parse_frame(waha(**{"from": sender})) is None


def test_sender_forms() -> None:
    assert parse_frame(waha(**{"from": "573001112233@s.whatsapp.net"})).sender == "+573001112233"  # type: ignore[union-attr]
    assert parse_frame(waha(**{"from": "573001112233:7@s.whatsapp.net"})).sender == "+573001112233"  # type: ignore[union-attr]


def test_media_without_caption_has_empty_body() -> None:
    msg = parse_frame(waha(body=None, hasMedia=True))
    assert msg is not None
    assert msg.body == ""


def test_millisecond_timestamps_become_seconds() -> None:
    msg = parse_frame(waha(timestamp=1741249702485))
    assert msg is not None
    assert msg.timestamp == 1741249702


def test_serialized_id_object() -> None:
    msg = parse_frame(waha(id={"_serialized": "true_57@c.us_X", "fromMe": False}))
    assert msg is not None
    assert msg.id == "true_57@c.us_X"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"not json", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"id": "x", "from": ', "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        ("[1, 2]", "invalid_schema"),
        ('"text"', "invalid_schema"),
        ("{}", "missing_field"),
        ('{"event": "message"}', "invalid_schema"),
        ('{"event": "message", "payload": []}', "invalid_schema"),
        ('{"event": 7, "payload": {}}', "invalid_schema"),
        ('{"from": "+573001112233", "body": "x", "timestamp": 1}', "missing_field"),
        ('{"id": "", "from": "+573001112233", "body": "x", "timestamp": 1}', "missing_field"),
        ('{"id": true, "from": "+573001112233", "body": "x", "timestamp": 1}', "missing_field"),
        ('{"id": "a", "body": "x", "timestamp": 1}', "missing_field"),
        ('{"id": "a", "from": "+573001112233", "timestamp": 1}', "missing_field"),
        ('{"id": "a", "from": "+573001112233", "body": 5, "timestamp": 1}', "invalid_schema"),
        ('{"id": "a", "from": "+573001112233", "body": "x"}', "missing_field"),
        ('{"id": "a", "from": "+573001112233", "body": "x", "timestamp": "1"}', "missing_field"),
        ('{"id": "a", "from": "+573001112233", "body": "x", "timestamp": -1}', "invalid_schema"),
        ('{"id": "a", "from": "juan", "body": "x", "timestamp": 1}', "invalid_sender"),
        ('{"id": "a", "from": "+0573001112233", "body": "x", "timestamp": 1}', "invalid_sender"),
        ('{"id": "a", "from": "12@c.us", "body": "x", "timestamp": 1}', "invalid_sender"),
        ('{"id": "a", "from": "x@lid", "body": "x", "timestamp": 1}', "invalid_sender"),
        ('{"a":' * 100_000, "invalid_json"),
    ],
    ids=lambda v: repr(v[:30]) if isinstance(v, str | bytes) else None,
)
def test_garbage_raises_invalid_message(frame: str | bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse_frame(frame)
    assert info.value.reason == reason


def test_invalid_sender_detail_hides_the_number() -> None:
    digits = "5730011122334455667788"  # too long for E.164
    with pytest.raises(InvalidMessage) as info:
        parse_frame(waha(**{"from": f"{digits}@c.us"}))
    assert info.value.reason == "invalid_sender"
    assert digits not in str(info.value)
    assert "7788" in str(info.value)  # the masked tail is still there to tell senders apart


def test_backoff_flat_then_capped_exponential_with_jitter() -> None:
    b = reconnect_delays(3.0, rng=random.Random(7))
    assert [next(b) for _ in range(3)] == [3.0, 3.0, 3.0]
    later = [next(b) for _ in range(30)]
    assert all(3.0 <= d <= 60.0 for d in later)
    assert max(later) > 30.0  # it does grow
    assert len(set(later)) > 20  # and it is jittered
    b = reconnect_delays(3.0, rng=random.Random(7))  # after a healthy connection
    assert next(b) == 3.0


def test_backoff_small_base_still_grows_to_the_cap() -> None:
    b = reconnect_delays(0.0, cap=5.0, flat=1, rng=random.Random(1))
    assert next(b) == 0.0
    ceilings = [next(b) for _ in range(40)]
    assert all(0.0 <= d <= 5.0 for d in ceilings)
    assert max(ceilings) > 2.5


def test_safe_url_hides_the_api_key() -> None:
    url = "ws://user:pw@localhost:3000/ws?x-api-key=secret&session=*&events=message"
    assert safe_url(url) == "ws://localhost:3000/ws"
