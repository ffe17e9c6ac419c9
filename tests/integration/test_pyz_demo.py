"""The drop-in artefacts: the shiv zipapp and `make demo`, as an operator runs them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from tests.integration.test_spine import check_samples
from tests.support.bridge import ROOT, BridgeProc, Publisher

PYZ = ROOT / "dist" / "botonera-bridge.pyz"


@pytest.fixture(scope="session")
def pyz(tmp_path_factory) -> str:
    """Build the .pyz once per run, exactly as `make pyz` does."""
    res = subprocess.run(
        ["make", "-B", "pyz"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert PYZ.is_file()
    return str(PYZ)


def _env(tmp) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "BACKEND_", "REDIS_"))}
    env["SHIV_ROOT"] = str(tmp)  # a private extraction cache, like the systemd unit's
    return env


def test_pyz_help_and_offline_check(pyz, tmp_path):
    env = _env(tmp_path)
    helped = subprocess.run([pyz, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert helped.returncode == 0
    assert "send-test" in helped.stdout
    checked = subprocess.run(
        [pyz, "check-config", "--offline"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stderr
    assert '"broker": "localhost"' in checked.stdout


def test_pyz_runs_the_samples(pyz, tmp_path, mosquitto, backend):
    bridge = BridgeProc(
        mqtt_port=mosquitto.port, backend_url=backend.url, argv=[pyz], env=_env(tmp_path)
    )
    publisher = Publisher(mosquitto.port)
    try:
        bridge.start()
        # `run` goes on in a fresh interpreter (same PID): shiv's bootstrap leftovers
        # would cost 1.4 MB of idle RSS for the process's life
        cmdline = Path(f"/proc/{bridge.pid}/cmdline").read_bytes().split(b"\0")
        assert b"-c" in cmdline, cmdline
        assert b"run" in cmdline, cmdline
        check_samples(backend, publisher)
        assert bridge.terminate() == 0
    finally:
        publisher.close()
        bridge.cleanup()


def test_make_demo():
    res = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "El backend guardó" in out
    assert out.count("_bridge: id=") == 4
    assert "WhatsApp → +57******0001" in out
    assert "código 0" in out
