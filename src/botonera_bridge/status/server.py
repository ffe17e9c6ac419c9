"""The status server: health, readiness, Prometheus metrics, ``/api/status`` and the page.

A small hand-written ASGI app served by hypercorn's trio worker inside the
bridge's nursery. No framework: six routes, a bearer token, and the lifespan
protocol (hypercorn's trio worker fails without it).

    GET /healthz     200 "ok" while the event loop runs (never needs the token)
    GET /readyz      200 {"ready": true} | 503 {"ready": false, "reasons": [...]}
    GET /metrics     Prometheus text exposition
    GET /api/status  snapshot() + {"ready", "reasons", "generated_at"}
    GET /api/alarms/<event id>   one alarm's timeline (404 when not tracked)
    GET|POST /webhooks/whatsapp  the Cloud API webhook (see :mod:`..webhook`)
    GET /            the status page for people on duty (Spanish)

With ``token`` set, everything but ``/healthz`` and the webhook needs
``Authorization: Bearer <token>``; ``/`` and ``/api/status`` also accept
``?token=`` so a phone browser can open a bookmarked link. The webhook is
authenticated by its signature (Meta cannot send the token).
"""

from __future__ import annotations

import hmac
import importlib.resources
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, Final, cast
from urllib.parse import parse_qs

import msgspec
import trio
from hypercorn.config import Config
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.trio import serve
from hypercorn.typing import Framework
from prometheus_client import CONTENT_TYPE_LATEST

from ..health import Health
from ..inbound.webhook import MAX_BODY, Webhook
from ..inbound.webhook import PATH as WEBHOOK_PATH
from ..messages import now_rfc3339
from ..metrics import Metrics

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

GRACEFUL_TIMEOUT: Final = 1.0  # seconds open requests get once the server is cancelled
_JSON: Final = b"application/json"
_TEXT: Final = b"text/plain; charset=utf-8"
_HTML: Final = b"text/html; charset=utf-8"
# The page is self-contained: inline style and script, fetches only its own origin.
_PAGE_CSP: Final = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'"
)
_COMMON_HEADERS: Final = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the page URL may carry ?token=
]
_QUERY_TOKEN_PATHS: Final = frozenset({"/", "/api/status"})
_ALARMS_PREFIX: Final = "/api/alarms/"
_encode = msgspec.json.Encoder().encode


def load_page() -> bytes:
    """The status page, shipped as package data (works from the zipapp too)."""
    return (
        importlib.resources.files(__package__ or "botonera_bridge.status")
        .joinpath("page.html")
        .read_bytes()
    )


class StatusApp:
    """The ASGI application. Plain callable, so tests can drive it without a socket."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        health: Health,
        snapshot: Callable[[], dict[str, Any]],
        token: str = "",
        page: bytes | None = None,
        wall: Callable[[], float] = time.time,
        alarm: Callable[[str], dict[str, Any] | None] | None = None,
        webhook: Webhook | None = None,
    ) -> None:
        self._alarm = alarm
        self._webhook = webhook
        self._metrics = metrics
        self._health = health
        self._snapshot = snapshot
        self._token = token.encode()
        self._page = load_page() if page is None else page
        self._wall = wall

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            if scope["path"] == WEBHOOK_PATH:
                await self._webhook_route(scope, receive, send)
            else:
                await self._http(scope, send)
        # websocket: not offered; returning closes it

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            if path in _ROUTES:
                await _respond(
                    send, 405, b"method not allowed\n", _TEXT, head, [(b"allow", b"GET, HEAD")]
                )
            else:
                await _respond(send, 404, b"not found\n", _TEXT, head)
            return
        if path == "/healthz":
            await _respond(send, 200, b"ok\n", _TEXT, head)
            return
        if path not in _ROUTES and not path.startswith(_ALARMS_PREFIX):
            await _respond(send, 404, b"not found\n", _TEXT, head)
            return
        if not self._authorized(scope, path):
            await _respond(
                send,
                401,
                b"unauthorized\n",
                _TEXT,
                head,
                [(b"www-authenticate", b'Bearer realm="botonera-bridge"')],
            )
            return
        try:
            if path.startswith(_ALARMS_PREFIX):
                status, body, ctype, extra = self._alarm_timeline(path[len(_ALARMS_PREFIX) :])
            else:
                status, body, ctype, extra = _ROUTES[path](self)
        except Exception:
            log.exception("status endpoint %s failed", path)
            await _respond(send, 500, b'{"error": "internal error"}', _JSON, head)
            return
        await _respond(send, status, body, ctype, head, extra)

    async def _webhook_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        hook = self._webhook
        if hook is None:
            await _respond(send, 404, b"not found\n", _TEXT, method == "HEAD")
            return
        if method in ("GET", "HEAD"):
            query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
            status, answer = hook.verify(query)
            await _respond(send, status, answer, _TEXT, method == "HEAD")
            return
        if method != "POST":
            await _respond(send, 405, b"method not allowed\n", _TEXT, False,
                           [(b"allow", b"GET, HEAD, POST")])  # fmt: skip
            return
        body = await _read_body(receive, MAX_BODY)
        if body is None:
            await _respond(send, 413, b"too large\n", _TEXT)
            return
        signature = None
        for name, value in scope["headers"]:
            if name == b"x-hub-signature-256":
                signature = bytes(value).decode("latin-1")
        try:
            status, reply = hook.post(body, signature)
        except Exception:  # a bug: Meta retries a 500 later, nothing is lost
            log.exception("webhook POST failed")
            status, reply = 500, b"internal error\n"
        await _respond(send, status, reply, _TEXT)

    def _authorized(self, scope: Scope, path: str) -> bool:
        if not self._token:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token):
                    return True
        if path in _QUERY_TOKEN_PATHS:
            query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
            for given_text in query.get("token", []):
                if hmac.compare_digest(given_text.encode(), self._token):
                    return True
        return False

    # -- routes: (status, body, content type, extra headers) ------------------------

    def _readyz(self) -> _Reply:
        reasons = self._health.reasons()
        if not reasons:
            return 200, _encode({"ready": True}), _JSON, []
        return 503, _encode({"ready": False, "reasons": reasons}), _JSON, []

    def _metrics_text(self) -> _Reply:
        return 200, self._metrics.render(), CONTENT_TYPE_LATEST.encode(), []

    def _api_status(self) -> _Reply:
        reasons = self._health.reasons()
        data = dict(self._snapshot())
        data["ready"] = not reasons
        data["reasons"] = reasons
        data["generated_at"] = now_rfc3339(int(self._wall() * 1e9))
        return 200, _encode(data), _JSON, []

    def _alarm_timeline(self, event_id: str) -> _Reply:
        found = self._alarm(event_id) if self._alarm is not None and event_id else None
        if found is None:
            return 404, _encode({"error": "alarma desconocida"}), _JSON, []
        return 200, _encode(found), _JSON, []

    def _page_html(self) -> _Reply:
        return 200, self._page, _HTML, [(b"content-security-policy", _PAGE_CSP)]


_Reply = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]
_ROUTES: Final[dict[str, Callable[[StatusApp], _Reply]]] = {
    "/healthz": lambda app: (200, b"ok\n", _TEXT, []),
    "/readyz": StatusApp._readyz,
    "/metrics": StatusApp._metrics_text,
    "/api/status": StatusApp._api_status,
    "/": StatusApp._page_html,
}


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None when it is longer than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # http.disconnect
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    head: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *_COMMON_HEADERS,
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


class _QuietLogger(HypercornLogger):
    """hypercorn's INFO lines ("Running on ... (CTRL + C to quit)") become DEBUG:
    serve_status logs its own line; warnings and errors pass unchanged."""

    async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        await self.debug(message, *args, **kwargs)


def hypercorn_config(listen: str) -> Config:
    config = Config()
    config.bind = [listen]
    config.accesslog = None  # one line per request is noise for a scraped endpoint
    config.errorlog = logging.getLogger(f"{__name__}.hypercorn")
    config.logger_class = _QuietLogger
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.include_server_header = False
    config.alpn_protocols = ["http/1.1"]
    return config


async def serve_status(
    listen: str,
    *,
    metrics: Metrics,
    health: Health,
    snapshot: Callable[[], dict[str, Any]],
    token: str = "",
    alarm: Callable[[str], dict[str, Any] | None] | None = None,
    webhook: Webhook | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``listen`` is ``host:port`` (port 0 picks a free one);
    ``started()`` receives the bound URLs (``["http://127.0.0.1:9108"]``) once listening."""
    app = StatusApp(
        metrics=metrics,
        health=health,
        snapshot=snapshot,
        token=token,
        alarm=alarm,
        webhook=webhook,
    )
    config = hypercorn_config(listen)

    async with trio.open_nursery() as nursery:
        # shutdown is by cancellation: the bridge's nursery owns this task
        urls: list[str] = await nursery.start(
            # hypercorn types scopes as TypedDicts; the app reads plain mappings
            partial(serve, cast(Framework, app), config, shutdown_trigger=trio.sleep_forever)
        )
        log.info(
            "status server listening on %s%s", ", ".join(urls), " (token required)" if token else ""
        )
        task_status.started(urls)
