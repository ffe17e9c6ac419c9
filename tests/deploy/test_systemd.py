"""systemd integration of the real bridge process: a notify socket served by the test,
and the shipped unit checked by systemd-analyze where it is installed."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.backend import Backend
from tests.support.bridge import ROOT, BridgeProc
from tests.support.procs import Mosquitto, free_port

UNIT = ROOT / "deploy" / "botonera-bridge.service"


class NotifySocket:
    """What systemd's NOTIFY_SOCKET receives, with arrival times."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        out = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                out.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                continue
        self.got += out
        return out

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for at, msg in self.collect(0.1):
                if predicate(msg):
                    return at
        raise AssertionError(f"no matching notification within {timeout}s: {self.got[-10:]}")

    def close(self) -> None:
        self.sock.close()


def _watchdog_gaps(items: list[tuple[float, str]], start: float, end: float) -> list[float]:
    times = [start] + [at for at, m in items if m == "WATCHDOG=1"] + [end]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_ready_without_broker_and_watchdog_through_outage(
    tmp_path: Path,
    backend: Backend,
    bridge_factory: Callable[..., BridgeProc],
    make_mosquitto: Callable[..., Mosquitto],
) -> None:
    port = free_port()  # nothing listens there yet: the broker is down at boot
    notify = NotifySocket(tmp_path / "notify.sock")
    bridge = bridge_factory(
        mqtt_port=port,
        env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"},  # ping every 0.5 s
    )
    try:
        t0 = time.monotonic()
        bridge.start(wait_ready=False)
        ready_at = notify.wait_for(lambda m: m == "READY=1", 10)
        assert ready_at - t0 <= 3.0, f"READY=1 after {ready_at - t0:.1f}s"
        outage = notify.collect(8)  # the broker stays unreachable
        assert any(m.startswith("STATUS=no listo: mqtt") for _, m in notify.got), notify.got
        assert max(_watchdog_gaps(outage, ready_at, time.monotonic())) < 2.0
        assert all("\n" not in m for _, m in notify.got if m.startswith("STATUS="))

        broker = make_mosquitto(port)
        notify.wait_for(lambda m: m == "STATUS=listo", 15)
        broker.stop()  # a second outage, this time of a broker that was there
        t1 = time.monotonic()
        second = notify.collect(6)
        assert max(_watchdog_gaps(second, t1, time.monotonic())) < 2.0
        assert any(m.startswith("STATUS=no listo: mqtt") for _, m in second), second
        assert bridge.running()
        assert bridge.terminate() == 0
    finally:
        notify.close()


def test_unit_file_contract() -> None:
    unit = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=always",
        "RestartPreventExitStatus=2",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "After=network-online.target time-sync.target",
        "ProtectProc=invisible",
        "ProcSubset=pid",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
    ):
        assert re.search(rf"^{re.escape(line)}", unit, re.M), line
    assert re.search(r"^LoadCredential=", unit, re.M)
    assert re.search(r"^MemoryMax=", unit, re.M)


def test_unit_exposure_at_most_2() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    res = subprocess.run(
        [tool, "security", "--offline=yes", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout[-2000:] + res.stderr[-2000:]
    assert float(m.group(1)) <= 2.0, res.stdout
