"""Drive the reference backend (tests/servers/backend.py) as a subprocess from tests.

Sync on purpose (plain pytest fixtures). Inside a Trio test, poll with
`await backend.wait_for_async(...)`: the sync `wait_for` would block the event loop
and so the bridge under test running in it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import trio

from tests.support.procs import free_port, wait_port

SERVER = Path(__file__).resolve().parent.parent / "servers" / "backend.py"
PROCESS_PATH = "/api/mqtt-alerts/process"
HTTP_TIMEOUT = 10.0  # seconds for one control call

T = TypeVar("T")


class Backend:
    """The reference backend on a free loopback port, with its sqlite file in a temp dir.

    `stop()`/`kill()` then `start()` keep the port and the stored alerts (a backend outage);
    `cleanup()` stops it and removes the temp dir.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        token: str | None = None,
        empresas: Iterable[str] | None = None,
        quiet: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.token = token
        self.empresas = tuple(empresas) if empresas is not None else None
        self.quiet = quiet
        self.dir = Path(tempfile.mkdtemp(prefix="bb-backend-"))
        self.db = self.dir / "backend.sqlite3"
        self.log = self.dir / "backend.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # --- process ------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [sys.executable, str(SERVER), "--port", str(self.port), "--db", str(self.db)]
        if self.token:
            argv += ["--token", self.token]
        if self.empresas is not None:
            argv += ["--empresas", ",".join(self.empresas)]
        if self.quiet:
            argv.append("--quiet")
        return argv

    def start(self) -> Backend:
        assert not self.running(), "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"reference backend did not start:\n{self.log_text()}") from None
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, by PID."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (clean exit), SIGKILL after 10 s."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- HTTP ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, what `backend.url` / `BACKEND_URL` should be set to."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def process_url(self) -> str:
        return self.url + PROCESS_PATH

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        """One request; returns (status, decoded JSON body or None, headers). Never raises on
        an HTTP error status (4xx/5xx are returned)."""
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        url = self.url + path  # always http://127.0.0.1:PORT/...
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)  # noqa: S310
        try:
            resp = urllib.request.urlopen(req, timeout=HTTP_TIMEOUT)  # noqa: S310
        except urllib.error.HTTPError as err:
            resp = err
        with resp:
            raw = resp.read()
            status = resp.status
            resp_headers = dict(resp.headers.items())
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode(errors="replace")
        return status, decoded, resp_headers

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        status, decoded, _ = self.call(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {path} -> {status}: {decoded}")
        return decoded

    def post_alert(
        self,
        payload: Any,
        *,
        key: str | None = None,
        token: str | None = None,
    ) -> tuple[int, Any]:
        """POST to /api/mqtt-alerts/process the way the bridge does; returns (status, body)."""
        headers = {"User-Agent": "tests/1"}
        if key is not None:
            headers["Idempotency-Key"] = key
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        status, decoded, _ = self.call("POST", PROCESS_PATH, payload, headers)
        return status, decoded

    def requests(self) -> list[dict[str, Any]]:
        """Every process POST received, in arrival order, refused ones included.

        Each: id, received_at, method, path, idempotency_key, authorization, user_agent,
        content_type, headers (lower-cased), body (text), payload (parsed JSON or None),
        empresa, status (None while still in flight)."""
        result: list[dict[str, Any]] = self._control("GET", "/_test/requests")
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Accepted alerts in acceptance order: id, idempotency_key, empresa, tipo_mensaje,
        received_at, payload."""
        result: list[dict[str, Any]] = self._control("GET", "/_test/alerts")
        return result

    def fault(self, **kw: Any) -> None:
        """Add a fault rule, e.g. `fault(status=503, seconds=15, retry_after=2)`,
        `fault(status=422, empresa="cota", count=1)`, `fault(delay=0.5)`,
        `fault(status=503, target="verify")`. See tests/servers/backend.py."""
        if not kw:
            raise ValueError("fault() needs at least one key; use clear_fault() to clear")
        self._control("POST", "/_test/fault", kw)

    def clear_fault(self) -> None:
        self._control("POST", "/_test/fault", {})

    def faults(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._control("GET", "/_test/faults")
        return result

    def reset(self) -> None:
        """Forget requests, alerts and faults."""
        self._control("POST", "/_test/reset", {})

    # --- polling ------------------------------------------------------------------------------

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,
        interval: float = 0.05,
        what: str = "",
    ) -> T:
        """Poll `predicate()` until it returns something truthy and return that; raise
        TimeoutError (with the backend's last requests) after `timeout` seconds.
        Sync: it blocks, so don't call it from a Trio test; use `wait_for_async` there."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(self._timeout_message(predicate, timeout, what))
            time.sleep(interval)

    async def wait_for_async(self, predicate: Callable[[], T], interval: float = 0.05) -> T:
        """`wait_for` for Trio tests: polls with trio.sleep so the bridge keeps running, and
        returns the first truthy value. No timeout of its own (STYLE.md: timeouts belong to
        the caller): wrap it, e.g. `with trio.fail_after(10): await backend.wait_for_async(f)`.
        Each poll makes one short blocking call to the local backend."""
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(interval)

    def _timeout_message(self, predicate: Callable[[], object], timeout: float, what: str) -> str:
        name = what or getattr(predicate, "__name__", repr(predicate))
        reqs = self.requests() if self.running() else []
        tail = [(r["idempotency_key"], r["empresa"], r["status"]) for r in reqs[-10:]]
        return (
            f"{name}: not true after {timeout}s; backend saw {len(reqs)} POSTs, "
            f"last (key, empresa, status): {tail}"
        )
