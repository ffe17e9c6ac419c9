"""The fake WAHA gateway (tests/servers/gateway.py) as a subprocess, driven over HTTP."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

SERVER = Path(__file__).resolve().parent.parent / "servers" / "gateway.py"


class GatewayProc:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bb-gateway-"))
        self.log = self.dir / "gateway.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(SERVER)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            m = re.search(r"listening on (\S+) control (\S+)", self.log.read_text())
            if m:
                self.url, self.control = m.group(1), m.group(2)
                return
            time.sleep(0.05)
        self.close()
        raise RuntimeError(f"gateway did not start: {self.log.read_text()}")

    def _call(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(self.control + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=15) as resp:
            return json.loads(resp.read())

    def send(self, frame: dict[str, Any] | str, wait: float = 10.0) -> int:
        data = frame if isinstance(frame, str) else json.dumps(frame)
        return int(self._call("POST", f"/send?wait={wait}", data.encode())["sent"])

    def poison(self, contact: str, stranger: str) -> int:
        """Send the poison frames of tests/servers/gateway.py (numbers as digits)."""
        path = f"/poison?contact={contact}&stranger={stranger}"
        return int(self._call("POST", path, b"")["frames"])

    def drop(self) -> int:
        return int(self._call("POST", "/drop", b"")["dropped"])

    def clients(self) -> dict[str, int]:
        result: dict[str, int] = self._call("GET", "/clients")
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def waha(msg_id: str, sender_digits: str, body: str, ts: int | None = None) -> dict[str, Any]:
    return {
        "event": "message",
        "session": "default",
        "payload": {
            "id": msg_id,
            "timestamp": ts or int(time.time()),
            "from": f"{sender_digits}@c.us",
            "fromMe": False,
            "body": body,
        },
    }
