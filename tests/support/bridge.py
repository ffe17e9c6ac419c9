"""Run the real bridge as a subprocess (`python -m botonera_bridge run`) and publish to it.

Fault tests SIGKILL and restart it; every process is signalled by PID only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parents[2]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_toml(path: Path, conf: dict[str, Any]) -> None:
    lines: list[str] = []
    tables = {k: v for k, v in conf.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in conf.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    for k, v in conf.items():
        if k not in tables and k not in arrays:
            lines.append(f"{k} = {toml_value(v)}")
    for name, table in tables.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for name, items in arrays.items():
        for item in items:
            lines.append(f"\n[[{name}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


class BridgeProc:
    """One bridge process with its own config file, log file and status port."""

    def __init__(
        self,
        *,
        mqtt_port: int,
        backend_url: str,
        redis_url: str = "",
        conf: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bb-bridge-"))
        self.status_port = free_port()
        base: dict[str, Any] = {
            "mqtt": {"broker": "127.0.0.1", "port": mqtt_port, "client_id": "bridge-test"},
            "backend": {"url": backend_url, "retry_max_delay": 1.0, "timeout": 5.0},
            "redis": {"url": redis_url},
            "websocket": {"url": ""},
            "status": {"listen": f"127.0.0.1:{self.status_port}"},
            "log": {"level": "INFO"},
        }
        self.conf = merge(base, conf or {})
        self.config = self.dir / "bridge.toml"
        write_toml(self.config, self.conf)
        self.log = self.dir / "bridge.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for var in ("BOTONERA_CONFIG", "MQTT_BROKER", "REDIS_URL", "BACKEND_URL"):
            if env is None or var not in env:
                self.env.pop(var, None)
        self.argv = argv or [sys.executable, "-m", "botonera_bridge"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int] = []

    def start(self, *, wait_ready: bool = True, timeout: float = 20.0) -> BridgeProc:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.argv, "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.dir,
            )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"bridge exited early:\n{self.log_text()[-4000:]}")
            if "botonera-bridge running" in self.log_text():
                return
            time.sleep(0.05)
        raise TimeoutError(f"bridge not ready after {timeout}s:\n{self.log_text()[-4000:]}")

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.exit_codes.append(self.proc.wait(10))

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.exit_codes.append(code)
        return code

    def cleanup(self) -> None:
        if self.running():
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def http(self, path: str, token: str = "") -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.status_port}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            exc.close()
            return exc.code, body

    def status(self) -> dict[str, Any]:
        code, body = self.http("/api/status")
        assert code == 200, body
        return json.loads(body)

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.argv, *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            cwd=self.dir,
        )


class Publisher:
    """A paho client in its own network thread, publishing QoS 1 like a botonera."""

    def __init__(self, port: int, client_id: str = "") -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"pub-{os.getpid()}-{time.monotonic_ns()}",
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self._connected = threading.Event()
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("publisher could not connect")

    def publish(
        self, payload: bytes | str | dict[str, Any], topic: str = "empresas", qos: int = 1
    ) -> Any:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        return self.client.publish(topic, payload, qos=qos)

    def publish_all(
        self, payloads: Iterable[bytes | str | dict[str, Any]], topic: str = "empresas"
    ) -> None:
        infos = [self.publish(p, topic) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str = "condition", every: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
