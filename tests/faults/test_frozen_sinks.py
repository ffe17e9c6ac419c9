"""Issue 9, must-show 3: a sink whose server hangs never holds up the other sink.

A backend that accepts connections and never answers (the process SIGSTOPped), and a
WhatsApp API that accepts and never answers: each is an outage of its own consumer
group only. Alarms keep reaching the other side within a second, and everything reaches
the frozen side once it answers again (duplicates only under the same Idempotency-Key).
"""

from __future__ import annotations

import re
import signal
import time
from datetime import datetime
from typing import Any

import pytest

from tests.servers.whatsapp_api import FakeWhatsApp
from tests.support.bridge import wait_until

from .conftest import EMPRESAS, cloud_whatsapp, keys_by_seq, wait_all_seqs

FROZEN = 20.0  # seconds the server hangs
EVERY = 2.0  # seconds between alarms while it hangs


def _conf(wa: FakeWhatsApp) -> dict[str, Any]:
    conf = cloud_whatsapp(wa.url, timeout=3.0)
    conf["backend"] = {"timeout": 3.0, "retry_max_delay": 5.0}
    return conf


def _alarm(seq: int) -> dict[str, Any]:
    return {
        "tipo_mensaje": "alarmas",
        "tipo_alarma": "CRITICA",
        "descripcion": f"alarma {seq}",
        "empresa": EMPRESAS[seq % len(EMPRESAS)],
        "seq": seq,
    }


def _wa_first(wa: FakeWhatsApp) -> dict[int, float]:
    """alarm seq -> monotonic time of its first accepted WhatsApp send."""
    out: dict[int, float] = {}
    for r in wa.requests():
        if r.status >= 300 or not isinstance(r.json, dict) or "text" not in r.json:
            continue
        for m in re.finditer(r"alarma (\d+)", r.json["text"]["body"]):
            out.setdefault(int(m.group(1)), r.at)
    return out


def _publish_while(publisher, seqs: range) -> dict[int, float]:
    """Publish one alarm every EVERY seconds; seq -> monotonic publish time."""
    at: dict[int, float] = {}
    t0 = time.monotonic()
    for n, seq in enumerate(seqs):
        time.sleep(max(0.0, t0 + n * EVERY - time.monotonic()))
        at[seq] = time.monotonic()
        publisher.publish(_alarm(seq))
    return at


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_frozen_backend_never_delays_whatsapp(bridge_factory, backend, publisher):
    wa = FakeWhatsApp()
    try:
        bridge = bridge_factory(conf=_conf(wa)).start()
        pid = bridge.pid
        publisher.publish(_alarm(0))
        wait_all_seqs(backend, {0}, timeout=10)
        backend.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
        frozen_at = time.monotonic()
        try:
            seqs = range(1, 1 + int(FROZEN / EVERY))
            published = _publish_while(publisher, seqs)
            wait_until(lambda: set(_wa_first(wa)) >= set(seqs), 5, "every alarm on WhatsApp")
            time.sleep(max(0.0, frozen_at + FROZEN - time.monotonic()))
        finally:
            backend.proc.send_signal(signal.SIGCONT)
        first = _wa_first(wa)
        waits = {s: first[s] - published[s] for s in seqs}
        assert max(waits.values()) <= 1.0, waits

        wait_all_seqs(backend, {0, *seqs}, timeout=45)
        assert all(len(k) == 1 for k in keys_by_seq(backend).values()), "a duplicate, new key"
        assert bridge.running()
        assert bridge.pid == pid
        print(
            f"9.3 frozen backend: {len(waits)} alarms to WhatsApp, worst {max(waits.values()):.2f}s"
        )
    finally:
        wa.close()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_frozen_whatsapp_never_delays_the_backend(bridge_factory, backend, publisher):
    wa = FakeWhatsApp()
    try:
        bridge = bridge_factory(conf=_conf(wa)).start()
        pid = bridge.pid
        publisher.publish(_alarm(0))
        wait_until(lambda: 0 in _wa_first(wa), 10, "the first alarm on WhatsApp")
        wall_minus_mono = time.time() - time.monotonic()
        # every request now hangs past the client's timeout (3 s): to the bridge the API
        # accepts and never answers; a shorter hang than FROZEN keeps the teardown short
        wa.set(delay=6.0)
        frozen_at = time.monotonic()
        try:
            seqs = range(1, 1 + int(FROZEN / EVERY))
            published = _publish_while(publisher, seqs)
            wait_all_seqs(backend, set(seqs), timeout=5)
            stored: dict[int, float] = {}
            for a in backend.alerts():
                seq = a["payload"].get("seq")
                at = datetime.fromisoformat(a["received_at"]).timestamp() - wall_minus_mono
                stored[seq] = min(at, stored.get(seq, at))
            waits = {s: stored[s] - published[s] for s in seqs}
            assert max(waits.values()) <= 1.0, waits
            time.sleep(max(0.0, frozen_at + FROZEN - time.monotonic()))
        finally:
            wa.set(delay=0.0)
        wait_until(lambda: set(_wa_first(wa)) >= {0, *seqs}, 45, "every alarm on WhatsApp")
        assert bridge.running()
        assert bridge.pid == pid
        print(
            f"9.3 frozen WhatsApp: {len(waits)} alarms to the backend, "
            f"worst {max(waits.values()):.2f}s"
        )
    finally:
        wa.close()
