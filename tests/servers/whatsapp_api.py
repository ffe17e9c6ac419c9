"""A fake WhatsApp Cloud API + WAHA ``sendText`` server, real HTTP on loopback.

Runs a stdlib ``ThreadingHTTPServer`` in a thread, so plain sync pytest fixtures
can own it. Every request is recorded (time, path, headers, JSON). Faults:

* ``error_every=(3, 130429)``: every 3rd call answers with that Graph error code
  (HTTP status from :data:`STATUS_FOR_CODE`, 400 for unknown codes);
* ``fail_number=("573001112233", 131047)``: calls for that number fail with the code;
* ``down=True``: every call answers 500;
* ``delay=0.5``: sleep before answering (timeouts);
* ``retry_after="2"``: add a Retry-After header to injected errors;
* ``pair_rate=5.5``: enforce Meta's pair rate: a message to a number that was
  sent one less than that many seconds ago (by arrival) answers 131056.

    server = FakeWhatsApp()
    server.url            # http://127.0.0.1:PORT
    server.set(down=True)
    server.requests()     # [Recorded(...), ...]
    server.close()
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STATUS_FOR_CODE = {
    130429: 429,  # throughput limit reached
    131056: 429,  # pair rate limit
    131000: 500,  # something went wrong
    131016: 503,  # service unavailable
    190: 401,  # access token expired
}
MESSAGES = {
    130429: "Rate limit hit",
    131056: "(Business Account, Consumer Account) pair rate limit hit",
    131057: "Account in maintenance mode",
    131000: "Something went wrong",
    131016: "Service unavailable",
    131047: "Re-engagement message",
    131026: "Message undeliverable",
    131051: "Unsupported message type",
    100: "Invalid parameter",
    190: "Access token has expired",
}
_CLOUD_PATH = re.compile(r"^/(v[0-9.]+)/([^/]+)/messages$")


@dataclass(frozen=True)
class Recorded:
    at: float  # time.monotonic() when the request arrived
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    json: Any
    status: int  # what we answered
    error_code: int | None = None  # the Graph error code we answered with, if any
    message_id: str | None = None  # the id we answered an accepted send with


@dataclass
class _Config:
    error_every: tuple[int, int] | None = None
    fail_number: tuple[str, int] | None = None
    down: bool = False
    delay: float = 0.0
    retry_after: str | None = None
    pair_rate: float = 0.0


@dataclass
class _State:
    config: _Config = field(default_factory=_Config)
    calls: int = 0
    last_sent: dict[str, float] = field(default_factory=dict)  # number -> accepted at
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        arrived = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        state = self.server.state
        with state.lock:
            state.calls += 1
            call = state.calls
            cfg = _Config(**vars(state.config))
        if cfg.delay:
            time.sleep(cfg.delay)
        with state.lock:  # one decision at a time: the pair rate looks at the last accepted
            status, answer, extra = self._answer(call, cfg, body, arrived)
            error = answer.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            sent_id = answer.get("messages", [{}])[0].get("id") or answer.get("id", {})
            sent_id = sent_id.get("_serialized") if isinstance(sent_id, dict) else sent_id
            state.requests.append(
                Recorded(
                    at=arrived,
                    method="POST",
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    json=body,
                    status=status,
                    error_code=code if isinstance(code, int) else None,
                    message_id=sent_id if status < 300 and isinstance(sent_id, str) else None,
                )
            )
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _answer(
        self, call: int, cfg: _Config, body: Any, arrived: float
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        cloud = _CLOUD_PATH.match(self.path)
        waha = self.path == "/api/sendText"
        if not (cloud or waha):
            return 404, {"error": {"code": 404, "message": f"no route {self.path}"}}, {}
        if cfg.down:
            return 500, {"error": {"code": 131000, "message": "Something went wrong"}}, {}
        number = _number(body, waha)
        code: int | None = None
        if cfg.fail_number is not None and number == cfg.fail_number[0]:
            code = cfg.fail_number[1]
        elif cfg.error_every is not None and call % cfg.error_every[0] == 0:
            code = cfg.error_every[1]
        elif cfg.pair_rate and arrived - self.server.state.last_sent.get(number, -1e9) < (
            cfg.pair_rate
        ):
            code = 131056
        if code is not None:
            extra = {"Retry-After": cfg.retry_after} if cfg.retry_after else {}
            status = STATUS_FOR_CODE.get(code, 400)
            error = {
                "message": f"(#{code}) {MESSAGES.get(code, 'Error')}",
                "type": "OAuthException",
                "code": code,
                "error_data": {"messaging_product": "whatsapp", "details": MESSAGES.get(code, "")},
                "fbtrace_id": uuid.uuid4().hex[:20],
            }
            return status, {"error": error}, extra
        self.server.state.last_sent[number] = arrived
        if waha:
            chat = body.get("chatId", "") if isinstance(body, dict) else ""
            mid = f"true_{chat}_{uuid.uuid4().hex[:20].upper()}"
            return 201, {"id": {"fromMe": True, "remote": chat, "_serialized": mid}, "ack": 1}, {}
        return (
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": number, "wa_id": number}],
                "messages": [{"id": f"wamid.{uuid.uuid4().hex.upper()}"}],
            },
            {},
        )


def _number(body: Any, waha: bool) -> str:
    if not isinstance(body, dict):
        return ""
    if waha:
        return str(body.get("chatId", "")).split("@", 1)[0]
    return str(body.get("to", ""))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True
    state: _State

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is a scenario here, not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeWhatsApp:
    """The server plus a small sync API for tests; close() it (or use ``with``)."""

    def __init__(self, **config: Any) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State(config=_Config(**config))
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def set(self, **config: Any) -> None:
        """Change faults: error_every, fail_number, down, delay, retry_after, pair_rate."""
        state = self._server.state
        with state.lock:
            for key, value in config.items():
                if not hasattr(state.config, key):
                    raise TypeError(f"unknown fault {key!r}")
                setattr(state.config, key, value)

    def reset(self) -> None:
        """Forget recorded requests, the call counter and every fault."""
        state = self._server.state
        with state.lock:
            state.config = _Config()
            state.calls = 0
            state.requests.clear()
            state.last_sent.clear()

    def sent_ids(self) -> list[tuple[str, str]]:
        """(recipient digits, message id) of each accepted send, in order."""
        return [
            (_number(r.json, r.path == "/api/sendText"), r.message_id)
            for r in self.requests()
            if r.message_id is not None
        ]

    def requests(self, path: str | None = None) -> list[Recorded]:
        state = self._server.state
        with state.lock:
            return [r for r in state.requests if path is None or r.path == path]

    def answered(self, code: int) -> int:
        """How many requests were answered with that Graph error code (131056: pair rate)."""
        return sum(1 for r in self.requests() if r.error_code == code)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeWhatsApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
