"""Issue 9, must-show 2: a frozen Redis (SIGSTOP) is a Redis that is gone.

Every Redis command has a deadline (`redis.timeout`, 1 s): past it the queues fall back
to memory, so no alarm waits for Redis; when Redis wakes up the memory moves into the
stream and nothing is lost. Commands that timed out may still run when Redis resumes
(an append, a read, an ack): duplicates are allowed only with the same Idempotency-Key.
"""

from __future__ import annotations

import json
import re
import signal
import time
from datetime import datetime
from typing import Any

import pytest

from tests.servers.whatsapp_api import FakeWhatsApp
from tests.support.bridge import wait_until

from .conftest import (
    CONTACTS,
    EMPRESAS,
    PacedPublisher,
    cloud_whatsapp,
    keys_by_seq,
    metrics,
    wait_all_seqs,
)

RATE = 10  # messages per second
BEFORE, FROZEN, AFTER = 4.0, 15.0, 3.0  # seconds of traffic around and during the freeze


def traffic(n: int) -> list[dict[str, Any]]:
    """estado for cota, and every 3 s an alarma, the four empresas in turn."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        if i % (3 * RATE) == 0:
            empresa = EMPRESAS[(i // (3 * RATE)) % len(EMPRESAS)]
            out.append(
                {
                    "tipo_mensaje": "alarmas",
                    "tipo_alarma": "CRITICA",
                    "descripcion": f"alarma {i}",
                    "empresa": empresa,
                    "seq": i,
                }
            )
        else:
            out.append({"tipo_mensaje": "estado", "empresa": "cota", "status": "ok", "seq": i})
    return out


def wa_sent(wa: FakeWhatsApp) -> dict[int, list[tuple[float, str]]]:
    """alarm seq -> [(monotonic arrival, number)] of every accepted send."""
    out: dict[int, list[tuple[float, str]]] = {}
    for r in wa.requests():
        if r.status >= 300 or not isinstance(r.json, dict) or "text" not in r.json:
            continue
        m = re.search(r"alarma (\d+)", r.json["text"]["body"])
        if m:
            out.setdefault(int(m.group(1)), []).append((r.at, r.json["to"]))
    return out


def names_redis_down(bridge) -> tuple[bool, bool]:
    code, body = bridge.http("/readyz")
    ready = json.loads(body)
    readyz = code == 503 and any(r.startswith("redis:") for r in ready.get("reasons", []))
    st = bridge.status()
    status = st["memory_fallback"] is True and st["components"]["redis"]["up"] is False
    return readyz, status


@pytest.mark.slow
def test_frozen_redis_never_stalls_alarms_and_loses_nothing(
    bridge_factory, backend, publisher, redis_server
):
    wa = FakeWhatsApp()
    try:
        bridge = bridge_factory(conf=cloud_whatsapp(wa.url) | {"redis": {"timeout": 1.0}}).start()
        pid = bridge.pid
        assert metrics(bridge)["botonera_redis_connected"] == 1.0
        wall_minus_mono = time.time() - time.monotonic()
        n = int((BEFORE + FROZEN + AFTER) * RATE)
        payloads = traffic(n)
        pub = PacedPublisher(publisher, payloads, rate=RATE)
        pub.start()
        time.sleep(BEFORE)

        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        frozen_at = time.time()
        try:
            # /readyz and /api/status name redis as down within 3 s of the freeze
            seen = {"readyz": None, "status": None}
            while time.time() - frozen_at < 5 and None in seen.values():
                readyz, status = names_redis_down(bridge)
                for k, v in (("readyz", readyz), ("status", status)):
                    if v and seen[k] is None:
                        seen[k] = time.time() - frozen_at
                time.sleep(0.1)
            for k in ("readyz", "status"):
                assert seen[k] is not None, seen
                assert seen[k] <= 3.0, seen
            time.sleep(max(0.0, frozen_at + FROZEN - time.time()))
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        thawed_at = time.time()

        pub.finish(30)
        seqs = set(range(n))
        wait_all_seqs(backend, seqs, timeout=30)
        alarm_seqs = {p["seq"] for p in payloads if p["tipo_mensaje"] == "alarmas"}
        sent = wait_until(
            lambda: s if set(s := wa_sent(wa)) >= alarm_seqs else None, 20, "every alarm on WA"
        )

        # nothing published during the freeze waited more than 5 s, backend or WhatsApp
        during = {i for i, at in enumerate(pub.sent_at) if frozen_at <= at <= thawed_at}
        assert len(during) >= FROZEN * RATE * 0.9
        stored: dict[int, float] = {}
        for a in backend.alerts():
            seq = a["payload"].get("seq")
            at = datetime.fromisoformat(a["received_at"]).timestamp()
            stored[seq] = min(at, stored.get(seq, at))
        backend_wait = max(stored[i] - pub.sent_at[i] for i in during)
        assert backend_wait <= 5.0, f"a message published while frozen waited {backend_wait:.1f}s"
        wa_wait = max(
            min(at for at, _ in sent[i]) + wall_minus_mono - pub.sent_at[i]
            for i in during & alarm_seqs
        )
        assert wa_wait <= 5.0, f"an alarm published while frozen reached WhatsApp {wa_wait:.1f}s"
        for i in alarm_seqs:
            to = {num for _, num in sent[i]}
            assert to == {CONTACTS[payloads[i]["empresa"]].lstrip("+")}, (i, to)

        # after SIGCONT: the memory moved into the stream, same process, nothing lost
        assert bridge.running()
        assert bridge.pid == pid
        wait_until(lambda: "Redis is back" in bridge.log_text(), 15, "the bridge on Redis again")
        wait_until(
            lambda: metrics(bridge).get('botonera_queue_depth{queue="memory"}') == 0.0,
            15,
            "memory queue empty",
        )
        assert all(len(k) == 1 for k in keys_by_seq(backend).values()), "a duplicate, new key"
        log = bridge.log_text()
        assert re.search(r"WARNING .*Redis unavailable \(no reply from Redis", log), log[-3000:]
        assert "died; restarting" not in log
        wait_until(lambda: bridge.http("/readyz")[0] == 200, 15, "/readyz 200 again")
        dups_wa = sum(len(v) - 1 for v in sent.values())
        print(
            f"9.2: {len(during)} published while frozen; worst wait backend {backend_wait:.2f}s, "
            f"WhatsApp {wa_wait:.2f}s; redis named down after readyz {seen['readyz']:.1f}s, "
            f"status {seen['status']:.1f}s; WhatsApp duplicates {dups_wa}"
        )
    finally:
        wa.close()
