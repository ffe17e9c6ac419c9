"""Short-lived operations behind the CLI: connectivity checks, send-test, publish."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import httpx
import msgspec
import trio
import trio_websocket

from .. import USER_AGENT
from ..config import MqttSettings, Settings
from ..errors import MqttError
from ..health import Health
from ..intake.mqtt import MqttClient, MqttMessage, open_mqtt
from ..intake.topics import RECEIPT_TOPIC, STATUS_TOPIC
from ..queues.redis_client import probe as redis_probe
from ..redact import mask_urls_in
from ..sendtest import send_test_identity

CHECK_TIMEOUT: Final = 5.0  # seconds per check

Result = tuple[bool, str, str]


def _cli_client_id(settings: Settings, what: str) -> str:
    return f"{settings.mqtt.client_id}-{what}-{os.getpid()}"


def _cli_mqtt(settings: Settings) -> MqttSettings:
    """The broker settings for a short-lived CLI client: it must never subscribe to the
    panels' topics (nor join the bridge's shared group) and take messages from the bridge."""
    return msgspec.structs.replace(settings.mqtt, topics=(), shared_group="")


_CAUSES: Final = (
    # what a library says -> the cause an operator acts on (one line, Spanish)
    (re.compile(r"connection refused|errno 111", re.I), "conexión rechazada"),
    (
        re.compile(
            r"name or service not known|nodename nor servname|temporary failure in name"
            r"|no address associated|errno -[235]\b|getaddrinfo",
            re.I,
        ),
        "host desconocido",
    ),
    (re.compile(r"certificate verify failed|CERTIFICATE_VERIFY_FAILED", re.I), "certificado"),
    (
        re.compile(r"not authori[sz]ed|bad user name or password|refused us", re.I),
        "credenciales rechazadas",
    ),
    (re.compile(r"timed out|timeout", re.I), "sin respuesta"),
    (re.compile(r"network is unreachable|no route to host", re.I), "red inalcanzable"),
)


_URL_SECRET: Final = re.compile(
    r"(?P<user>//[^/:@\s]*:)[^@/\s]+@|(?P<key>[?&](?:[\w-]*(?:token|key|secret|password)[\w-]*)=)[^&#\s]+",
    re.I,
)


def mask_url(url: str) -> str:
    """A URL fit for a ✓/✗ line: the password of ``user:pw@`` and secret-looking query
    values (``token``, ``x-api-key``, ...) replaced by ****."""
    return _URL_SECRET.sub(lambda m: f"{m['user']}****@" if m["user"] else f"{m['key']}****", url)


def describe(exc: BaseException) -> str:
    """The exception and what caused it, one line: httpx and trio-websocket wrap the
    OSError or SSLError that says what went wrong."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 4:
        if isinstance(seen, BaseExceptionGroup):  # trio's happy eyeballs: the first attempt
            seen = seen.exceptions[0]
            continue
        text = str(seen) or type(seen).__name__
        if text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    return " ← ".join(parts)


def cause(detail: str) -> str:
    """``detail`` prefixed with the one-word cause it shows, when it shows one."""
    for pattern, what in _CAUSES:
        if pattern.search(detail):
            return f"{what}: {detail}"
    return detail


@asynccontextmanager
async def open_cli_mqtt(
    settings: Settings, what: str, *, subscribe: bool = False
) -> AsyncIterator[tuple[MqttClient, trio.MemoryReceiveChannel[MqttMessage]]]:
    """A short-lived, connected broker client for a CLI command.

    Gives up at the first failed attempt (refused, unknown host, bad credentials, TLS)
    or after CHECK_TIMEOUT, raising MqttError with the cause: a command answers in
    seconds, it does not retry like the daemon."""
    health = Health(stall_timeout=CHECK_TIMEOUT)
    send, recv = trio.open_memory_channel[MqttMessage](16)
    m = settings.mqtt
    failure = ""
    async with (
        open_mqtt(
            _cli_mqtt(settings),
            client_id=_cli_client_id(settings, what),
            clean_session=True,
            status_topic=False,
            health=health,
        ) as client,
        trio.open_nursery() as n,
    ):

        async def first_failure() -> None:
            nonlocal failure
            # polled: Health has no event, and a CLI waits for seconds at most
            down = health.why_down
            while health.up.get("mqtt") or down.get("mqtt") == "not connected yet":  # noqa: ASYNC110
                await trio.sleep(0.02)
            failure = health.why_down.get("mqtt", "down")
            n.cancel_scope.cancel()

        with trio.move_on_after(CHECK_TIMEOUT) as connecting:
            async with trio.open_nursery() as watch:
                watch.start_soon(first_failure)
                await n.start(client.run, send if subscribe else None)
                watch.cancel_scope.cancel()
        if connecting.cancelled_caught:
            failure = f"sin respuesta en {CHECK_TIMEOUT:.0f} s (timed out)"
        if failure or n.cancel_scope.cancel_called:
            n.cancel_scope.cancel()
        else:
            try:
                yield client, recv
            finally:
                n.cancel_scope.cancel()
    if failure:
        raise MqttError(f"broker MQTT {m.broker}:{m.port}: {cause(failure)}")


async def check_broker(settings: Settings) -> Result:
    m = settings.mqtt
    name = f"broker MQTT {m.broker}:{m.port}"
    try:
        async with open_cli_mqtt(settings, "check"):
            pass
    except MqttError as exc:
        return False, name, str(exc).removeprefix(name + ": ")
    except OSError as exc:
        return False, name, cause(describe(exc))
    return True, name, "conectado" + (" (TLS)" if m.tls else "")


async def check_redis(settings: Settings) -> Result:
    # TLS, Sentinel, ACL and unix sockets are the client's: it names the cause itself.
    with trio.move_on_after(CHECK_TIMEOUT):
        return await redis_probe(settings.redis)
    return False, "Redis", f"no answer within {CHECK_TIMEOUT:.0f}s"


async def _http_reachable(name: str, url: str, headers: dict[str, str]) -> Result:
    shown = mask_url(url)
    try:
        async with httpx.AsyncClient(
            timeout=CHECK_TIMEOUT, headers={"User-Agent": USER_AGENT}, follow_redirects=False
        ) as c:
            resp = await c.get(url, headers=headers)
    except httpx.HTTPError as exc:
        return False, name, f"{shown}: {cause(describe(exc))}"
    code = resp.status_code
    if 300 <= code < 400:
        where = mask_url(resp.headers.get("location", "?"))
        return False, name, f"{shown}: redirección: configure la URL final (HTTP {code} → {where})"
    if code >= 500:
        return False, name, f"{shown} answered HTTP {code}"
    if code in (401, 403):
        return False, name, f"{shown}: credenciales rechazadas (HTTP {code}: token?)"
    return True, name, f"{shown} HTTP {code}"


async def check_backend(settings: Settings) -> Result:
    headers = (
        {"Authorization": f"Bearer {settings.backend.token}"} if settings.backend.token else {}
    )
    url = settings.backend.url.rstrip("/") + "/api/mqtt-alerts?limit=1"
    return await _http_reachable("backend", url, headers)


async def check_gateway(settings: Settings) -> Result:
    url = settings.websocket.url
    if not url:
        return True, "gateway WhatsApp (WebSocket)", "desactivado"
    try:
        with trio.fail_after(CHECK_TIMEOUT):
            async with trio_websocket.open_websocket_url(url):
                pass
    except trio.TooSlowError:
        return (
            False,
            "gateway WhatsApp (WebSocket)",
            f"{url}: no answer within {CHECK_TIMEOUT:.0f}s",
        )
    except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed) as exc:
        return False, "gateway WhatsApp (WebSocket)", f"{mask_url(url)}: {cause(describe(exc))}"
    return True, "gateway WhatsApp (WebSocket)", f"{url} conectado"


async def check_whatsapp(settings: Settings) -> Result:
    wa = settings.whatsapp
    if wa.provider == "log":
        return True, "WhatsApp API", "proveedor log (sin red)"
    if wa.provider == "cloud":
        url = f"{wa.api_url.rstrip('/')}/{wa.api_version}/{wa.phone_number_id}"
        return await _http_reachable(
            "WhatsApp Cloud API", url, {"Authorization": f"Bearer {wa.token}"} if wa.token else {}
        )
    url = f"{wa.api_url.rstrip('/')}/api/sessions"
    return await _http_reachable("WAHA", url, {"X-Api-Key": wa.token} if wa.token else {})


async def run_checks(settings: Settings) -> list[Result]:
    checks = (check_broker, check_redis, check_backend, check_gateway, check_whatsapp)
    results: list[Result | None] = [None] * len(checks)

    async def one(i: int) -> None:
        results[i] = await checks[i](settings)

    async with trio.open_nursery() as n:
        for i in range(len(checks)):
            n.start_soon(one, i)
    # one place for every line printed: a secret inside a URL never shows
    return [
        (ok, mask_urls_in(name), mask_urls_in(detail)) for ok, name, detail in filter(None, results)
    ]


async def publish_once(settings: Settings, topic: str, payload: bytes) -> None:
    """Connect, publish at QoS 1, wait for the PUBACK; MqttError with the cause otherwise,
    within CHECK_TIMEOUT for the connection and as long again for the PUBACK."""
    async with open_cli_mqtt(settings, "pub") as (client, _):
        with trio.move_on_after(CHECK_TIMEOUT) as publishing:
            await client.publish(topic, payload, qos=1)
    if publishing.cancelled_caught:
        m = settings.mqtt
        raise MqttError(f"broker MQTT {m.broker}:{m.port}: sin confirmación (PUBACK) del mensaje")


async def send_test(settings: Settings, empresa: str, wait_seconds: float) -> tuple[bool, str]:
    """Publish a prueba alarm and wait for its receipt. Returns (ok, what happened).

    ``wait_seconds`` is the command's own ``--timeout``: running out is an answer
    (which stage failed), not an error, so it is not left to a caller's scope."""
    body, event_id = send_test_identity(empresa)
    receipt_topic = RECEIPT_TOPIC + event_id
    unreachable = f"broker unreachable ({settings.mqtt.broker}:{settings.mqtt.port})"
    receipt: dict[str, str] | None = None
    bridge_status = "unknown"
    try:
        async with open_cli_mqtt(settings, "test", subscribe=True) as (client, recv):
            await client.subscribe(STATUS_TOPIC, 1)
            await client.subscribe(receipt_topic, 1)
            await client.publish(settings.mqtt.topics[0], msgspec.json.encode(body), qos=1)
            with trio.move_on_after(wait_seconds):
                async for msg in recv:
                    client.ack(msg)
                    if msg.topic == STATUS_TOPIC:
                        bridge_status = msg.payload.decode(errors="replace")
                    elif msg.topic == receipt_topic:
                        receipt = msgspec.json.decode(msg.payload)
                        break
    except MqttError as exc:  # the cause: refused, unknown host, credentials, certificate
        m = settings.mqtt
        return (
            False,
            f"{unreachable}: {str(exc).removeprefix(f'broker MQTT {m.broker}:{m.port}: ')}",
        )
    if receipt is None:
        if bridge_status != "online":
            why = f"bridge down (status {bridge_status!r})"
        else:
            why = (
                "the bridge is online but its sinks did not confirm (backend or WhatsApp retrying)"
            )
        return False, f"no receipt within {wait_seconds:.0f}s: {why}"
    failed = [k for k in ("backend", "whatsapp") if receipt.get(k) == "failed"]
    if failed:
        names = {"backend": "backend failed", "whatsapp": "WhatsApp failed"}
        stages = " and ".join(names[f] for f in failed)
        return False, f"{stages} (event {event_id}, receipt {receipt})"
    outcome = f"backend {receipt.get('backend')}, whatsapp {receipt.get('whatsapp')}"
    return True, f"event {event_id}: {outcome}"
