"""Short-lived operations behind the CLI: connectivity checks, send-test, publish."""

from __future__ import annotations

import os
from typing import Final

import httpx
import msgspec
import trio
import trio_websocket

from . import USER_AGENT
from .config import MqttSettings, Settings
from .errors import MqttError
from .mqtt import MqttMessage, open_mqtt
from .queues.redis_client import probe as redis_probe

CHECK_TIMEOUT: Final = 5.0  # seconds per check
STATUS_TOPIC: Final = "botonera-bridge/status"
RECEIPT_TOPIC: Final = "botonera-bridge/receipts/"

Result = tuple[bool, str, str]


def _cli_client_id(settings: Settings, what: str) -> str:
    return f"{settings.mqtt.client_id}-{what}-{os.getpid()}"


def _cli_mqtt(settings: Settings) -> MqttSettings:
    """The broker settings for a short-lived CLI client: it must never subscribe to the
    panels' topics (nor join the bridge's shared group) and take messages from the bridge."""
    return msgspec.structs.replace(settings.mqtt, topics=(), shared_group="")


async def check_broker(settings: Settings) -> Result:
    m = settings.mqtt
    name = f"broker MQTT {m.broker}:{m.port}"
    try:
        with trio.fail_after(CHECK_TIMEOUT):
            async with (
                open_mqtt(
                    m,
                    client_id=_cli_client_id(settings, "check"),
                    clean_session=True,
                    status_topic=False,
                ) as client,
                trio.open_nursery() as n,
            ):
                await n.start(client.run, None)
                n.cancel_scope.cancel()
    except trio.TooSlowError:
        return False, name, f"no answer within {CHECK_TIMEOUT:.0f}s"
    except (MqttError, OSError) as exc:
        return False, name, str(exc)
    return True, name, "conectado"


async def check_redis(settings: Settings) -> Result:
    # TLS, Sentinel, ACL and unix sockets are the client's: it names the cause itself.
    with trio.move_on_after(CHECK_TIMEOUT):
        return await redis_probe(settings.redis)
    return False, "Redis", f"no answer within {CHECK_TIMEOUT:.0f}s"


async def _http_reachable(name: str, url: str, headers: dict[str, str]) -> Result:
    try:
        async with httpx.AsyncClient(
            timeout=CHECK_TIMEOUT, headers={"User-Agent": USER_AGENT}
        ) as c:
            resp = await c.get(url, headers=headers)
    except httpx.HTTPError as exc:
        return False, name, f"{url}: {exc!r}"
    if resp.status_code >= 500:
        return False, name, f"{url} answered HTTP {resp.status_code}"
    if resp.status_code in (401, 403):
        return False, name, f"{url} answered HTTP {resp.status_code} (token?)"
    return True, name, f"{url} HTTP {resp.status_code}"


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
        return False, "gateway WhatsApp (WebSocket)", f"{url}: {exc!r}"
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
    return [r for r in results if r is not None]


async def publish_once(settings: Settings, topic: str, payload: bytes) -> None:
    with trio.fail_after(settings.backend.timeout + CHECK_TIMEOUT):
        async with (
            open_mqtt(
                settings.mqtt,
                client_id=_cli_client_id(settings, "pub"),
                clean_session=True,
                status_topic=False,
            ) as client,
            trio.open_nursery() as n,
        ):
            await n.start(client.run, None)
            await client.publish(topic, payload, qos=1)
            n.cancel_scope.cancel()


async def send_test(settings: Settings, empresa: str, wait_seconds: float) -> tuple[bool, str]:
    """Publish a prueba alarm and wait for its receipt. Returns (ok, what happened).

    ``wait_seconds`` is the command's own ``--timeout``: running out is an answer
    (which stage failed), not an error, so it is not left to a caller's scope."""
    from .cli import send_test_identity

    body, event_id = send_test_identity(empresa)
    receipt_topic = RECEIPT_TOPIC + event_id
    unreachable = f"broker unreachable ({settings.mqtt.broker}:{settings.mqtt.port})"
    receipt: dict[str, str] | None = None
    bridge_status = "unknown"
    send, recv = trio.open_memory_channel[MqttMessage](16)
    try:
        async with (
            open_mqtt(
                _cli_mqtt(settings),
                client_id=_cli_client_id(settings, "test"),
                clean_session=True,
                status_topic=False,
            ) as client,
            trio.open_nursery() as n,
        ):
            with trio.move_on_after(CHECK_TIMEOUT) as connecting:
                await n.start(client.run, send)
            if connecting.cancelled_caught:
                n.cancel_scope.cancel()
                return False, unreachable
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
            n.cancel_scope.cancel()
    except MqttError as exc:
        return False, f"{unreachable}: {exc}"
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
