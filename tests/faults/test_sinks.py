"""Scenario 6: with the backend down, WhatsApp still gets each alarm within 1 s."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.servers.whatsapp_api import FakeWhatsApp
from tests.support.bridge import wait_until

from .conftest import alarm, alarms, wait_all_seqs

# one contact number per empresa: WhatsApp spaces messages to one number by >= 6 s
CONTACTS = {
    "cota": "+573001110001",
    "tocancipa": "+573001110002",
    "funza": "+573001110003",
    "madrid": "+573001110004",
    "sopo": "+573001110005",
    "chia": "+573001110006",
}
ROUNDS = 2
LATENCY = 1.0  # seconds, publish -> WhatsApp API request


@pytest.fixture
def whatsapp_api() -> Iterator[FakeWhatsApp]:
    with FakeWhatsApp() as server:
        yield server


@pytest.mark.slow
def test_whatsapp_gets_each_alarm_within_1s_while_backend_is_down(
    bridge_factory, backend, publisher, whatsapp_api
):
    bridge_factory(
        conf={
            "whatsapp": {
                "provider": "cloud",
                "api_url": whatsapp_api.url,
                "phone_number_id": "1234567890",
                "token": "test-token",
            },
            "empresas": [
                *({"id": e, "contactos": [n]} for e, n in CONTACTS.items()),
                {"id": "zipaquira"},  # no contacts: backend only
            ],
        }
    ).start()
    backend.kill()  # connection refused from now on
    # a backlog the backend sink keeps retrying (WhatsApp has nobody to tell for zipaquira)
    publisher.publish_all(alarms(300, start=1000, empresas=["zipaquira"]))
    time.sleep(1)

    sent: dict[int, tuple[str, float]] = {}  # seq -> (number, monotonic publish time)
    seq = 0
    for r in range(ROUNDS):
        if r:
            time.sleep(6.5)  # the per-number minimum interval
        for empresa, number in CONTACTS.items():
            sent[seq] = (number.lstrip("+"), time.monotonic())
            publisher.publish(alarm(seq, empresa, descripcion=f"incendio {seq}"))
            seq += 1
        time.sleep(LATENCY + 0.5)

    wait_until(lambda: len(whatsapp_api.requests()) >= len(sent), 10, "every WhatsApp message")
    got = {}
    for req in whatsapp_api.requests():
        body = req.json["text"]["body"]
        for s, (number, _) in sent.items():
            if f"incendio {s}" in body and req.json["to"] == number:
                got.setdefault(s, req.at)
    late = {
        s: round(got[s] - t, 3) for s, (_, t) in sent.items() if s in got and got[s] - t > LATENCY
    }
    missing = sorted(set(sent) - set(got))
    assert not missing, f"no WhatsApp message for alarms {missing}"
    assert not late, f"WhatsApp later than {LATENCY}s with the backend down: {late}"
    assert not backend.running()
    worst = max(got[s] - t for s, (_, t) in sent.items())

    backend.start()  # then the backend catches up with everything
    wait_all_seqs(backend, set(range(seq)) | set(range(1000, 1300)), timeout=60)
    assert len(whatsapp_api.requests()) == len(sent), "WhatsApp messages were sent twice"
    print(f"scenario 6: worst publish->WhatsApp latency {worst * 1000:.0f} ms with backend down")
