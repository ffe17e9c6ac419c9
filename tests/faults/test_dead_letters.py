"""Scenarios 7 and 8: a permanent rejection is dead-lettered without blocking anyone, and
`dead-letters list|replay` inspect it and deliver it once the cause is fixed."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime

import pytest

from tests.support.bridge import BridgeProc, wait_until

from .conftest import PacedPublisher, alarm, alarms, keys_by_seq, wait_all_seqs

N = 400


def dead_letters(bridge: BridgeProc) -> list[dict]:
    out = bridge.cli("dead-letters", "list", "--json", "--limit", "100")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.mark.slow
def test_422_is_dead_lettered_after_one_attempt_and_others_keep_flowing(
    bridge_factory, backend, publisher
):
    bridge = bridge_factory().start()
    backend.fault(status=422, empresa="funza", count=1, body={"error": "empresa suspendida"})
    pub = PacedPublisher(publisher, alarms(N), rate=100)  # seq 2 is funza's first: the 422
    pub.start()
    pub.finish(30)
    rejected = 2
    wait_all_seqs(backend, set(range(N)) - {rejected}, timeout=30)

    attempts = [r for r in backend.requests() if (r["payload"] or {}).get("seq") == rejected]
    assert [r["status"] for r in attempts] == [422], "a 422 must be tried exactly once"
    assert rejected not in {a["payload"]["seq"] for a in backend.alerts()}
    entries = wait_until(lambda: dead_letters(bridge), 10, "the dead letter")
    assert len(entries) == 1
    dl = entries[0]
    assert dl["reason"] == "backend_422"
    assert dl["sink"] == "backend"
    assert json.loads(dl["payload"])["seq"] == rejected
    assert "empresa suspendida" in dl["detail"]

    # no head-of-line blocking: publish -> stored latency of everyone else, funza included
    latencies = []
    for a in backend.alerts():
        stored = datetime.fromisoformat(a["received_at"]).timestamp()
        latencies.append(stored - pub.sent_at[a["payload"]["seq"]])
    worst = p99(latencies)
    assert worst < 1.0, f"p99 publish->backend latency {worst:.3f}s"
    assert all(len(k) == 1 for k in keys_by_seq(backend).values())
    print(
        f"scenario 7: p99 {worst * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
        f"over {len(latencies)}"
    )


@pytest.mark.slow
def test_dead_letter_listed_then_replayed_once_the_cause_is_fixed(
    bridge_factory, backend, publisher
):
    bridge = bridge_factory(conf={"empresas": [{"id": "madrid", "contactos": ["+573009998877"]}]})
    bridge.start()
    backend.fault(status=422, empresa="madrid")  # until we fix it
    publisher.publish(alarm(7, "madrid", descripcion="puerta forzada"))
    publisher.publish(alarm(8, "cota"))
    wait_all_seqs(backend, {8}, timeout=15)
    entries = wait_until(lambda: dead_letters(bridge), 15, "the dead letter")
    assert len(entries) == 1
    dl = entries[0]
    assert dl["reason"] == "backend_422"
    assert json.loads(dl["payload"])["seq"] == 7
    human = bridge.cli("dead-letters", "list")
    assert human.returncode == 0
    assert dl["id"] in human.stdout
    assert "backend_422" in human.stdout
    first_key = keys_by_seq(backend)[7]

    backend.clear_fault()  # the cause is fixed
    res = bridge.cli("dead-letters", "replay", dl["id"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert dl["id"] in res.stdout
    wait_all_seqs(backend, {7, 8}, timeout=15)
    assert keys_by_seq(backend)[7] == first_key, "the replay must keep the Idempotency-Key"
    wait_until(lambda: dead_letters(bridge) == [], 10, "the replayed entry to leave the list")
    # the replay goes to the sink that failed only: the contact was told once
    time.sleep(1)
    told = re.findall(r"WhatsApp → \S+: .*puerta forzada", bridge.log_text())
    assert len(told) == 1, told
    missing = bridge.cli("dead-letters", "replay", dl["id"])
    assert missing.returncode == 1
