"""`dead-letters list|replay`: read the ``:dead`` stream and re-inject entries into the outbox."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec

from ..config import Settings
from ..errors import BridgeError, InvalidMessage, RedisError
from ..intake.topics import decode_mqtt
from ..messages import Event, decode_event
from .link import RedisLink
from .outbox import DeadLetters, Outbox, dead_letter_json, decode_dead
from .redis_client import Redis, open_redis_settings
from .replies import entry_list

PAGE: Final = 100  # entries per XRANGE: a reply stays small however big :dead is


def _need_redis(settings: Settings) -> Settings:
    if not settings.redis.url:
        raise BridgeError(
            "dead letters live in Redis; with redis.url empty they are only kept in the "
            "running bridge's memory (see /api/status)"
        )
    return settings


async def list_dead(settings: Settings, limit: int) -> list[dict[str, Any]]:
    async with open_redis_settings(_need_redis(settings).redis) as r:
        reply = await r.execute(
            "XREVRANGE", f"{settings.redis.prefix}:dead", "+", "-", "COUNT", limit
        )
    return [dead_letter_json(decode_dead(eid, fields)) for eid, fields in entry_list(reply)]


async def replay(settings: Settings, entry_id: str | None) -> list[tuple[str, bool, str]]:
    """Re-queue one entry (or all). A rejected payload is decoded again first, so a
    fixed cause (config, empresa) lets it through; one still invalid stays put."""
    key = f"{settings.redis.prefix}:dead"
    async with open_redis_settings(_need_redis(settings).redis) as redis:
        link = RedisLink(redis)
        await link.connect()
        outbox = Outbox(
            link,
            settings.redis.prefix,
            consumer="replay",
            memory_limit=1,
            dead=DeadLetters(link, key),
        )
        results = []
        async for eid, fields in _entries(redis, key, entry_id):
            dl = decode_dead(eid, fields)
            try:
                event = _event_of(dl, settings)
            except InvalidMessage as exc:
                results.append((eid, False, f"still invalid: {exc}"))
                continue
            await outbox.append([(event, "")], only=dl.sink)
            await _delete(redis, key, eid)
            results.append(
                (eid, True, f"re-queued as event {event.id} ({event.tipo}, {event.empresa or '-'})")
            )
        return results


async def _entries(
    redis: Redis, key: str, entry_id: str | None
) -> AsyncIterator[tuple[str, dict[bytes, bytes]]]:
    if entry_id:
        for entry in entry_list(await redis.execute("XRANGE", key, entry_id, entry_id)):
            yield entry
        return
    start = "-"
    while True:
        page = entry_list(await redis.execute("XRANGE", key, start, "+", "COUNT", PAGE))
        for entry in page:
            yield entry
        if len(page) < PAGE:
            return
        start = f"({page[-1][0]}"


def _event_of(dl: Any, settings: Settings) -> Event:
    if dl.event:
        try:
            ev: Event = decode_event(dl.event)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        else:
            return ev
    raw = base64.b64decode(dl.payload) if dl.payload_encoding == "base64" else dl.payload.encode()
    _, event = decode_mqtt(
        raw, dl.topic or settings.mqtt.topics[0], time.time_ns(), settings.mqtt.max_payload
    )
    return event


async def _delete(redis: Redis, key: str, eid: str) -> None:
    try:
        await redis.execute("XDEL", key, eid)
    except RedisError as exc:
        raise BridgeError(f"re-queued {eid} but could not remove it from {key}: {exc}") from exc
