"""Logs and metrics for operators: journald priorities, JSON fields, /metrics content,
one INFO line per delivered alarm (not per estado or heartbeat)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from botonera_bridge import log as log_mod
from tests.support.backend import Backend
from tests.support.bridge import BridgeProc, Publisher, wait_until

ALARM = {"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "empresa": "cota", "id": "a-1"}
ESTADO = {"tipo_mensaje": "estado", "status": "online", "empresa": "cota", "id": "e-1"}
HEARTBEAT = {"tipo_mensaje": "heartbeat", "empresa": "cota", "dispositivo": "p1"}


def test_journal_stream_must_be_stderr_itself(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as f, open(tmp_path / "other", "w") as g:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert log_mod.on_journal(env, f)
        assert not log_mod.on_journal(env, g)  # stderr redirected elsewhere: no prefixes
        assert not log_mod.on_journal({"JOURNAL_STREAM": "junk"}, f)
        assert not log_mod.on_journal({}, f)
    rec = logging.makeLogRecord({"levelno": logging.WARNING, "levelname": "WARNING", "msg": "x"})
    assert log_mod.JournalFormatter().format(rec).startswith("<4>")


def _journal_env(bridge: BridgeProc) -> dict[str, str]:
    bridge.log.touch()
    st = os.stat(bridge.log)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journal_prefixes_metrics_and_info_per_alarm(
    bridge_factory: Callable[..., BridgeProc], backend: Backend, publisher: Publisher
) -> None:
    bridge = bridge_factory(conf={"empresas": [{"id": "cota", "contactos": ["+573001110001"]}]})
    bridge.env.update(_journal_env(bridge))
    bridge.start()
    publisher.publish_all([ESTADO, HEARTBEAT, ALARM])
    wait_until(lambda: len(backend.alerts()) == 2, 15, "estado and alarm at the backend")
    text = bridge.log_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert all(re.match(r"<[2-7]>", ln) for ln in lines), lines[:5]
    assert any(ln.startswith("<6>") for ln in lines)
    wait_until(lambda: "delivered to backend" in bridge.log_text(), 10, "delivery log line")
    delivered = [ln for ln in bridge.log_text().splitlines() if "delivered to backend" in ln]
    assert len(delivered) == 1, delivered  # the alarm, not the estado
    assert "tipo=alarmas" in delivered[0]

    code, body = bridge.http("/metrics")
    assert code == 200
    m = body.decode()
    assert "_created" not in m
    assert re.search(r"^process_resident_memory_bytes \d", m, re.M)
    assert re.search(r'^botonera_build_info\{.*version="[^"]+"', m, re.M)
    wait_until(
        lambda: (
            'botonera_open_alarms{empresa_bucket="cota"} 1.0' in bridge.http("/metrics")[1].decode()
        ),
        5,
        "open alarm gauge",
    )
    assert 'botonera_open_alarms{empresa_bucket="sin_configurar"} 0.0' in m
    assert re.search(r"^botonera_escalations_total 0\.0", m, re.M)
    assert re.search(r"^botonera_memory_fallback_limit \d", m, re.M)
    assert bridge.terminate() == 0


def test_json_logs_carry_event_fields(
    bridge_factory: Callable[..., BridgeProc], backend: Backend, publisher: Publisher
) -> None:
    bridge = bridge_factory(conf={"log": {"format": "json"}}).start()
    publisher.publish(ALARM)
    wait_until(lambda: "delivered to backend" in bridge.log_text(), 15, "delivery")
    records = [json.loads(ln) for ln in bridge.log_text().splitlines() if ln.startswith("{")]
    (rec,) = [r for r in records if r["msg"].startswith("delivered to backend")]
    assert rec["empresa"] == "cota"
    assert rec["tipo"] == "alarmas"
    assert rec["sink"] == "backend"
    assert rec["event_id"] == backend.alerts()[0]["payload"]["_bridge"]["id"]
    assert bridge.terminate() == 0
