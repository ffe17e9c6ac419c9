"""The WhatsApp Cloud API webhook: Meta's verification, signed callbacks, parsing.

Served by the status server (``GET|POST /webhooks/whatsapp``), authenticated by
its signature, never by the status token:

- ``GET ?hub.mode=subscribe&hub.verify_token=T&hub.challenge=C`` → 200 ``C`` when
  ``T`` is ``whatsapp.verify_token``, else 403;
- ``POST`` with ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(body, app_secret)>``:
  a missing or wrong signature → 403 and nothing processed. A signed body is parsed
  at once and its messages and statuses are queued for :meth:`Webhook.run`; the
  answer (200) never waits for them. A full queue answers 503 (Meta retries later).

Every message and status inside a body is checked on its own: a malformed one is
logged with its reason, counted in ``botonera_rejected_total{source="webhook"}``
and skipped; the others go on. Messages join the same inbox as WebSocket frames
(same de-duplication by id, commands and allowlist); statuses become receipts.
The app secret is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import trio

from ..errors import InvalidMessage
from ..ids import as_e164
from ..metrics import Metrics
from ..watch.receipts import Receipt
from .ws_receiver import MAX_TIMESTAMP, Inbound

log = logging.getLogger(__name__)

PATH: Final = "/webhooks/whatsapp"
MAX_BODY: Final = 1 << 20  # bytes; Meta's bodies are a few KiB
QUEUE: Final = 1000  # messages and statuses waiting to be handled
MAX_ITEMS: Final = 1000  # messages + statuses taken from one body
SOURCE: Final = "webhook"
_STATUSES: Final = frozenset({"sent", "delivered", "read", "failed"})
_decoder: Final = msgspec.json.Decoder(dict[str, Any])

Item = Inbound | Receipt


def signature_ok(secret: bytes, body: bytes, header: str | None) -> bool:
    """True when ``header`` is ``sha256=<hex HMAC-SHA256 of body with secret>``."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(header[len("sha256=") :].strip().lower(), expected)


def parse_body(body: bytes, metrics: Metrics | None = None) -> list[Item]:
    """The messages (as :class:`Inbound`) and statuses (as :class:`Receipt`) of one body.

    Raises :class:`InvalidMessage` when the body is not a webhook object at all.
    """
    try:
        obj = _decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidMessage("invalid_json", "webhook body is not a JSON object") from exc
    entries = obj.get("entry")
    if not isinstance(entries, list):
        raise InvalidMessage("invalid_schema", "'entry' must be a list")
    out: list[Item] = []
    for value in _values(entries):
        for kind, parse in (("messages", _message), ("statuses", _status)):
            raw = value.get(kind)
            if raw is None:
                continue
            if not isinstance(raw, list):
                _reject(metrics, "invalid_schema", f"'{kind}' must be a list")
                continue
            for item in raw:
                if len(out) >= MAX_ITEMS:
                    _reject(metrics, "too_many_items", f"more than {MAX_ITEMS} items in one body")
                    return out
                try:
                    parsed = parse(item)
                except InvalidMessage as exc:
                    _reject(metrics, exc.reason, exc.detail)
                    continue
                if parsed is not None:
                    out.append(parsed)
    return out


def _values(entries: list[Any]) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        for change in changes if isinstance(changes, list) else []:
            if not isinstance(change, dict) or change.get("field", "messages") != "messages":
                continue
            value = change.get("value")
            if isinstance(value, dict):
                out.append(value)
    return out


def _reject(metrics: Metrics | None, reason: str, detail: str) -> None:
    if metrics is not None:
        metrics.rejected.labels(source=SOURCE, reason=reason).inc()
    log.warning("webhook item skipped: %s: %r", reason, detail)


def _text(value: Any, name: str, limit: int = 256) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise InvalidMessage("missing_field", f"'{name}' is missing, empty or too long")
    return value.strip()


def _number(value: Any, name: str) -> str:
    number = as_e164(_text(value, name, 32))
    if number is None:
        raise InvalidMessage("invalid_sender", f"'{name}' is not a phone number")
    return number


def _seconds(value: Any) -> int:
    """Meta sends timestamps as strings of seconds; numbers are accepted too."""
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 20:
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage("missing_field", "'timestamp' is missing or not a number")
    if value != value or not 0 <= value < MAX_TIMESTAMP:
        raise InvalidMessage("invalid_schema", "'timestamp' must be a number in 0..2**63")
    return int(value)


def _message(item: Any) -> Inbound | None:
    if not isinstance(item, dict):
        raise InvalidMessage("invalid_schema", "a message must be an object")
    kind = item.get("type", "text")
    text = item.get("text")
    if kind == "text":
        if not isinstance(text, dict) or not isinstance(text.get("body"), str):
            raise InvalidMessage("invalid_schema", "'text.body' must be a string")
        body = text["body"]
    elif kind == "button" and isinstance(item.get("button"), dict):
        body = str(item["button"].get("text", ""))
    else:
        body = ""  # media, reactions…: answered like an unknown command
    return Inbound(
        id=_text(item.get("id"), "id"),
        sender=_number(item.get("from"), "from"),
        body=body[:4096],
        timestamp=_seconds(item.get("timestamp")),
    )


def _status(item: Any) -> Receipt | None:
    if not isinstance(item, dict):
        raise InvalidMessage("invalid_schema", "a status must be an object")
    status = item.get("status")
    if not isinstance(status, str) or status not in _STATUSES:
        raise InvalidMessage("invalid_schema", "'status' is not sent, delivered, read or failed")
    reason = ""
    errors = item.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code, title = errors[0].get("code"), errors[0].get("title")
        reason = (
            f"{code if isinstance(code, int) else '?'} {title if isinstance(title, str) else ''}"
        )
    recipient = item.get("recipient_id")
    return Receipt(
        message_id=_text(item.get("id"), "id"),
        status=status,
        number=_number(recipient, "recipient_id") if recipient is not None else "",
        timestamp=_seconds(item.get("timestamp", 0)),
        reason=reason.strip()[:200],
    )


class Webhook:
    """The two routes' logic, and the task that hands queued items on."""

    def __init__(
        self,
        *,
        app_secret: str,
        verify_token: str,
        metrics: Metrics | None = None,
        queue: int = QUEUE,
    ) -> None:
        self._secret = app_secret.encode()
        self._verify_token = verify_token.encode()
        self._metrics = metrics
        self._send, self._recv = trio.open_memory_channel[Item](queue)

    def verify(self, query: dict[str, list[str]]) -> tuple[int, bytes]:
        """Meta's subscription check (GET)."""
        mode = query.get("hub.mode", [""])[0]
        token = query.get("hub.verify_token", [""])[0].encode()
        challenge = query.get("hub.challenge", [""])[0]
        ok = bool(self._verify_token) and hmac.compare_digest(token, self._verify_token)
        if mode != "subscribe" or not ok or not challenge or len(challenge) > 256:
            log.warning("webhook verification refused (wrong verify_token or mode)")
            return 403, b"forbidden\n"
        log.info("webhook verified by the Cloud API")
        return 200, challenge.encode()

    def post(self, body: bytes, signature: str | None) -> tuple[int, bytes]:
        """One callback (POST): check, parse, queue; never waits on processing."""
        if not signature_ok(self._secret, body, signature):
            self._count("bad_signature")
            log.warning(
                "webhook POST refused: %s signature (%d bytes)",
                "missing" if not signature else "wrong",
                len(body),
            )
            return 403, b"forbidden\n"
        try:
            items = parse_body(body, self._metrics)
        except InvalidMessage as exc:
            self._count(exc.reason)
            log.warning("webhook body rejected: %s: %r", exc.reason, exc.detail)
            return 200, b"ok\n"  # signed but useless: a retry would not help
        for n, item in enumerate(items):
            try:
                self._send.send_nowait(item)
            except trio.WouldBlock:
                left = len(items) - n
                self._count("queue_full")
                log.warning("webhook queue full: %d items refused with 503 (Meta retries)", left)
                return 503, b"busy\n"
        return 200, b"ok\n"

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.rejected.labels(source=SOURCE, reason=reason).inc()

    async def run(
        self,
        on_message: Callable[[Inbound], Awaitable[None]],
        on_receipt: Callable[[Receipt], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hand queued messages to the inbox and statuses to the receipts, one by one."""
        task_status.started()
        async for item in self._recv:
            try:
                if isinstance(item, Receipt):
                    await on_receipt(item)
                else:
                    await on_message(item)
            except Exception as exc:  # one item never stops the others
                self._count("internal_error")
                log.error("webhook item not handled: %s", type(exc).__name__)
                log.debug("webhook item failure", exc_info=True)
