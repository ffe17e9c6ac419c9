"""Outgoing WhatsApp providers: log, WhatsApp Cloud API, WAHA.

Each provider implements :class:`Sender`. Failures are translated at this
boundary into :class:`~botonera_bridge.errors.TransientDelivery` (retry with
backoff) or :class:`WhatsAppRejected` (a :class:`PermanentDelivery`: never
retried). Tokens and full phone numbers never reach a log line or an
exception message: numbers are always shown through :func:`ids.mask_phone`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

from .. import USER_AGENT
from ..config import WhatsappSettings
from ..errors import PermanentDelivery, TransientDelivery
from ..ids import mask_phone
from . import texts

if TYPE_CHECKING:  # imported when a networked provider is opened: the log provider needs none
    import httpx

logger: Final = logging.getLogger("botonera_bridge.whatsapp")

SINK: Final = "whatsapp"
#: Graph error codes worth retrying (rate limits, temporary service errors)
TRANSIENT_CODES: Final = frozenset({130429, 131056, 131057, 131000, 131016})
#: ... of which these say "too many messages": throughput (130429), pair rate (131056)
THROTTLE_CODES: Final = frozenset({130429, 131056})
#: Graph error codes that never succeed on retry (24 h window, not on WhatsApp,
#: unsupported type, invalid parameter, expired token)
PERMANENT_CODES: Final = frozenset({131047, 131026, 131051, 100, 190})
_TRANSIENT_STATUS: Final = frozenset({408, 425, 429})
MAX_BODY: Final = 500  # characters of an error body kept in exceptions
MAX_ID: Final = 256  # characters of a provider message id kept
MAX_RETRY_AFTER: Final = 3600.0  # seconds; anything longer is treated as garbage

_json: Final = msgspec.json.Encoder()
_probe: Final = msgspec.json.Decoder(dict[str, Any])


class Sender(Protocol):
    """Sends one WhatsApp message to one number.

    ``to`` is E.164 (``+57...``). Returns the provider's message id (None when it
    gives none). Raises TransientDelivery (retry) or PermanentDelivery (do not retry).
    """

    async def send_text(
        self, to: str, text: str, *, template_params: tuple[str, str, str] | None = None
    ) -> str | None: ...


class WhatsAppRejected(PermanentDelivery):
    """Raised when the provider rejects a message for good.

    ``code`` is the Graph error code (``"131047"``) or the HTTP status when the
    body carried none; it becomes the dead-letter reason ``whatsapp_<code>``.
    """

    def __init__(
        self, message: str, *, code: str, status: int | None = None, body: str = ""
    ) -> None:
        self.code = code
        super().__init__(message, sink=SINK, status=status, body=body)


class WhatsAppThrottled(TransientDelivery):
    """Raised when the provider says we send too fast: Graph codes 130429 (throughput)
    and 131056 (pair rate: too many messages to one number), or HTTP 429.

    The sink answers by moving that number's next slot (``retry_after`` when given,
    else the pair interval), never by retrying sooner. ``code`` as in WhatsAppRejected.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None = None,
        body: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.code = code
        super().__init__(message, sink=SINK, status=status, body=body, retry_after=retry_after)


def digits(to: str) -> str:
    """'+57 300 111 2233' -> '573001112233'; raises WhatsAppRejected if no number is left."""
    d = re.sub(r"\D", "", to)
    if not 7 <= len(d) <= 15:
        raise WhatsAppRejected(f"invalid phone number {mask_phone(to)}", code="invalid_number")
    return d


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        import email.utils  # rare (an HTTP-date); the email package costs idle RSS

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _scrub(text: str, number: str) -> str:
    """Remove a full phone number from provider-supplied text."""
    return text.replace(number, mask_phone(number)) if number else text


def message_id(response: httpx.Response) -> str | None:
    """The provider's id of a sent message: Cloud ``messages[0].id``, WAHA ``id``."""
    try:
        body = _probe.decode(response.content)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    found: Any = body.get("id")
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        found = messages[0].get("id")
    if isinstance(found, dict):  # WAHA (WEBJS) answers {"id": {"_serialized": ...}}
        found = found.get("_serialized")
    return found[:MAX_ID] if isinstance(found, str) and found else None


def classify(response: httpx.Response, number: str, provider: str) -> str | None:
    """Return the message id on success; raise the right DeliveryError otherwise."""
    status = response.status_code
    if 200 <= status < 300:
        return message_id(response)
    body = _scrub(response.text[:MAX_BODY], number)
    code: int | None = None
    reason = ""
    try:
        err = _probe.decode(response.content).get("error")
    except (msgspec.DecodeError, msgspec.ValidationError):
        err = None
    if isinstance(err, dict):
        raw_code = err.get("code")
        if isinstance(raw_code, int) and not isinstance(raw_code, bool):
            code = raw_code
        details = (
            err.get("error_data", {}).get("details")
            if isinstance(err.get("error_data"), dict)
            else None
        )
        reason = str(details or err.get("message") or "")
    elif isinstance(err, str):
        reason = err
    reason = _scrub(reason, number)[:200]
    where = f"{provider} HTTP {status}" + (f" code {code}" if code is not None else "")
    message = f"{where} for {mask_phone(number)}" + (f": {reason}" if reason else "")
    wait = retry_after(response.headers.get("retry-after"))
    if code in THROTTLE_CODES or (status == 429 and code not in PERMANENT_CODES):
        raise WhatsAppThrottled(
            message,
            code=str(code if code is not None else status),
            status=status,
            body=body,
            retry_after=wait,
        )
    if code in TRANSIENT_CODES or (
        code not in PERMANENT_CODES and (status in _TRANSIENT_STATUS or status >= 500)
    ):
        raise TransientDelivery(
            message,
            sink=SINK,
            status=status,
            body=body,
            retry_after=wait,
        )
    raise WhatsAppRejected(
        message, code=str(code if code is not None else status), status=status, body=body
    )


async def _post(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], number: str, provider: str
) -> str | None:
    import httpx

    try:
        response = await client.post(
            url, content=_json.encode(payload), headers={"Content-Type": "application/json"}
        )
    except httpx.TimeoutException as exc:
        raise TransientDelivery(f"{provider} timeout: {type(exc).__name__}", sink=SINK) from exc
    except httpx.TransportError as exc:
        raise TransientDelivery(
            f"{provider} unreachable: {type(exc).__name__}: {_scrub(str(exc), number)}", sink=SINK
        ) from exc
    return classify(response, number, provider)


class LogSender:
    """``whatsapp.provider = "log"``: writes the message to the log; no network."""

    async def send_text(
        self, to: str, text: str, *, template_params: tuple[str, str, str] | None = None
    ) -> str | None:
        # A digest has several lines: one log record stays one line ("⏎" marks the breaks).
        logger.info("WhatsApp → %s: %s", mask_phone(to), text.replace("\n", " ⏎ "))
        return None


class CloudSender:
    """WhatsApp Cloud API: ``POST {api_url}/{api_version}/{phone_number_id}/messages``.

    Sends a template message when ``template`` is configured and the caller gave
    ``template_params`` (empresa, tipo, detalle); a plain text message otherwise.
    """

    def __init__(self, client: httpx.AsyncClient, settings: WhatsappSettings) -> None:
        self._client = client
        self._settings = settings
        base = settings.api_url.rstrip("/")
        self.url = f"{base}/{settings.api_version}/{settings.phone_number_id}/messages"

    def reconfigure(self, settings: WhatsappSettings) -> None:
        """Reload (SIGHUP): a new template or language applies to the next message."""
        self._settings = msgspec.structs.replace(
            self._settings, template=settings.template, language=settings.language
        )

    def body(
        self, number: str, text: str, template_params: tuple[str, str, str] | None
    ) -> dict[str, Any]:
        s = self._settings
        if s.template and template_params is not None:
            # Meta refuses parameters with newlines, tabs, > 4 spaces or > 1,024 characters.
            empresa, tipo, detalle = template_params
            one = texts.one_line
            template_params = (one(empresa), one(tipo), one(detalle))
            return {
                "messaging_product": "whatsapp",
                "to": number,
                "type": "template",
                "template": {
                    "name": s.template,
                    "language": {"code": s.language},
                    "components": [
                        {
                            "type": "body",
                            "parameters": [{"type": "text", "text": p} for p in template_params],
                        }
                    ],
                },
            }
        return {
            "messaging_product": "whatsapp",
            "to": number,
            "type": "text",
            "text": {"body": texts.clip(text)},
        }

    async def send_text(
        self, to: str, text: str, *, template_params: tuple[str, str, str] | None = None
    ) -> str | None:
        number = digits(to)
        return await _post(
            self._client, self.url, self.body(number, text, template_params), number, "cloud"
        )


class WahaSender:
    """WAHA gateway: ``POST {api_url}/api/sendText`` with ``X-Api-Key``."""

    def __init__(self, client: httpx.AsyncClient, settings: WhatsappSettings) -> None:
        self._client = client
        self._session = settings.session
        self.url = f"{settings.api_url.rstrip('/')}/api/sendText"

    async def send_text(
        self, to: str, text: str, *, template_params: tuple[str, str, str] | None = None
    ) -> str | None:
        number = digits(to)
        payload = {"session": self._session, "chatId": f"{number}@c.us", "text": texts.clip(text)}
        return await _post(self._client, self.url, payload, number, "waha")


@asynccontextmanager
async def open_sender(settings: WhatsappSettings) -> AsyncIterator[Sender]:
    """The configured provider, owning one ``httpx.AsyncClient`` for its lifetime."""
    if settings.provider == "log":
        yield LogSender()
        return
    headers = {"User-Agent": USER_AGENT}
    if settings.provider == "cloud":
        headers["Authorization"] = f"Bearer {settings.token}"
    elif settings.token:
        headers["X-Api-Key"] = settings.token
    import httpx

    async with httpx.AsyncClient(
        headers=headers, timeout=httpx.Timeout(settings.timeout), follow_redirects=False
    ) as client:
        if settings.provider == "cloud":
            yield CloudSender(client, settings)
        else:
            yield WahaSender(client, settings)
