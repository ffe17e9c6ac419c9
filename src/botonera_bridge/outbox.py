"""The outbox (events for the sinks) and the dead-letter store, on durable streams."""

from __future__ import annotations

import base64
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NamedTuple

import msgspec

from . import texts
from .errors import RedisError
from .messages import Event, decode_event, encode_event
from .metrics import Metrics
from .queues.link import RedisLink
from .queues.streams import DurableStream, Item, Receipt

log = logging.getLogger(__name__)

GROUPS: Final = ("backend", "whatsapp")
MEMORY_DEAD_LIMIT: Final = 10000


class Entry(NamedTuple):
    id: str
    event: Event


class DeadLetter(msgspec.Struct, kw_only=True):
    id: str = ""
    reason: str
    detail: str
    at: str
    topic: str = ""
    payload: str = ""  # UTF-8 text, or base64 when payload_encoding == "base64"
    payload_encoding: str = "utf-8"
    event: bytes = b""  # the msgpack Event, when there was one
    sink: str = ""


class DeadLetters:
    """The ``:dead`` stream; a bounded memory list while Redis is away."""

    def __init__(self, link: RedisLink, key: str, metrics: Metrics | None = None) -> None:
        self.link = link
        self.key = key
        self._metrics = metrics
        self.memory: deque[DeadLetter] = deque(maxlen=MEMORY_DEAD_LIMIT)
        self._encoder = msgspec.msgpack.Encoder()
        link.on_recovery(self._flush)

    async def add(
        self,
        reason: str,
        detail: str,
        *,
        payload: bytes = b"",
        topic: str = "",
        event: Event | None = None,
        sink: str = "",
    ) -> None:
        if self._metrics is not None:
            self._metrics.dead_letters.labels(reason=reason).inc()
        try:
            text, enc = payload.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, enc = base64.b64encode(payload).decode(), "base64"
        dl = DeadLetter(
            reason=reason,
            detail=detail[:2000],
            at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            topic=topic,
            payload=text,
            payload_encoding=enc,
            event=encode_event(event) if event is not None else b"",
            sink=sink,
        )
        if self.link.up:
            try:
                await self._flush()  # anything parked in memory while Redis was away goes first
                await self._xadd([dl])
                return
            except RedisError as exc:
                self.link.down(exc)
        self.memory.append(dl)

    async def _xadd(self, items: Sequence[DeadLetter]) -> None:
        redis = self.link.redis
        assert redis is not None
        await redis.pipeline(
            [["XADD", self.key, "*", "dl", self._encoder.encode(d)] for d in items]
        )

    async def _flush(self) -> None:
        if self.memory:
            await self._xadd(list(self.memory))
            self.memory.clear()


def decode_dead(entry_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
    dl = msgspec.msgpack.decode(fields[b"dl"], type=DeadLetter)
    dl.id = entry_id
    return dl


class Outbox:
    """Events waiting for the backend and WhatsApp sinks."""

    def __init__(
        self,
        link: RedisLink,
        prefix: str,
        *,
        consumer: str,
        memory_limit: int,
        dead: DeadLetters,
        reclaim_idle: float = 60.0,
        on_finished: Callable[[Event, dict[str, str]], Awaitable[None]] | None = None,
    ) -> None:
        self.dead = dead
        self.stream = DurableStream(
            link,
            f"{prefix}:outbox",
            GROUPS,
            consumer=consumer,
            memory_limit=memory_limit,
            dedup_prefix=f"{prefix}:seen:",
            on_poison=self._poison,
            reclaim_idle_ms=int(reclaim_idle * 1000),
        )
        self._link = link
        self._receipts_key = f"{prefix}:receipts"
        self._on_finished = on_finished
        self._outcomes: dict[str, dict[str, str]] = {}
        # per sink: entries finished by this process, by outcome (ok, skipped, failed)
        self.finished_count: dict[str, dict[str, int]] = {
            g: {"ok": 0, "skipped": 0, "failed": 0} for g in GROUPS
        }
        # per sink, optional: does this event need that sink at all? (decided at append:
        # an event no sink needs costs that sink's consumer group no round trip)
        self.needed_by: dict[str, Callable[[Event], bool]] = {}

    async def append(self, events: Sequence[tuple[Event, str]], *, only: str = "") -> list[Receipt]:
        """Append (event, dedup key) pairs; see DurableStream.append. ``only``: one sink.
        A sink whose ``needed_by`` predicate says no skips the event (counted as skipped)."""
        others = tuple(g for g in GROUPS if g != only) if only else ()
        needs = self.needed_by
        skips = [
            ",".join(g for g in GROUPS if g in others or (g in needs and not needs[g](e)))
            for e, _ in events
        ]
        before = dict(self.stream.skipped)
        receipts = await self.stream.append([(encode_event(e), k) for e, k in events], skips=skips)
        for g, n in self.stream.skipped.items():
            if g not in others and n != before.get(g, 0):  # ``only`` replays are not finishes
                self.finished_count[g]["skipped"] += n - before.get(g, 0)
        return receipts

    async def emit(self, event: Event) -> None:
        """Append one bridge-made event (watchdog, acuse). It does not wait for the memory
        fallback to deliver it: nothing upstream waits for an ack, and the watchdog or a
        command must not stall behind a backend outage."""
        await self.append([(event, "")])

    def delivery(self, group: str) -> SinkDelivery:
        return SinkDelivery(self, group)

    async def _poison(self, group: str, item: Item, deliveries: int) -> None:
        event = _safe_decode(item.data)
        await self.dead.add(
            "too_many_deliveries",
            f"{group}: delivered {deliveries} times without success",
            payload=event.payload if event else item.data,
            topic=event.topic if event else "",
            event=event,
            sink=group,
        )

    async def finished(self, group: str, event: Event, outcome: str) -> None:
        """Record a sink's outcome for a send-test event; fire once all sinks are done."""
        if not event.prueba or self._on_finished is None:
            return
        outcomes: dict[str, str] | None = None
        if self._link.up:
            redis = self._link.redis
            assert redis is not None
            key = f"{self._receipts_key}:{event.id}"
            try:
                _, _, flat = await redis.pipeline(
                    [["HSET", key, group, outcome], ["EXPIRE", key, 3600], ["HGETALL", key]]
                )
                got = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
                if set(got) >= set(GROUPS):
                    outcomes = got
                    await redis.execute("DEL", key)
            except RedisError as exc:
                self._link.down(exc)
        if outcomes is None:
            mine = self._outcomes.setdefault(event.id, {})
            mine[group] = outcome
            if set(mine) >= set(GROUPS):
                outcomes = self._outcomes.pop(event.id)
        if outcomes is not None:
            await self._on_finished(event, outcomes)


class SinkDelivery:
    """What a sink sees: read, ack, dead-letter (the Delivery protocol)."""

    def __init__(self, outbox: Outbox, group: str) -> None:
        self._outbox = outbox
        self.group = group

    async def read(self, count: int) -> list[Entry]:
        while True:
            items = await self._outbox.stream.read(self.group, count)
            out = []
            for item in items:
                event = _safe_decode(item.data)
                if event is None:
                    await self._outbox.dead.add(
                        "corrupt_outbox_entry", f"entry {item.id} cannot be decoded",
                        payload=item.data, sink=self.group,
                    )  # fmt: skip
                    await self._outbox.stream.ack(self.group, [item.id])
                    continue
                out.append(Entry(item.id, event))
            if out:
                return out

    async def ack(self, entries: Sequence[Entry], outcome: str = "ok") -> None:
        await self._outbox.stream.ack(self.group, [e.id for e in entries])
        self._outbox.finished_count[self.group][outcome] += len(entries)
        for e in entries:
            await self._outbox.finished(self.group, e.event, outcome)

    async def dead_letter(self, entry: Entry, reason: str, detail: str) -> None:
        ev = entry.event
        await self._outbox.dead.add(
            reason, detail, payload=ev.payload, topic=ev.topic, event=ev, sink=self.group
        )
        await self._outbox.stream.ack(self.group, [entry.id])
        self._outbox.finished_count[self.group]["failed"] += 1
        await self._outbox.finished(self.group, ev, "failed")

    def pending(self) -> int:
        return self._outbox.stream.inflight(self.group)


def whatsapp_needs(recipients: Callable[[Event], Sequence[str]]) -> Callable[[Event], bool]:
    """The WhatsApp sink's "would I send this?", decided at append: the same test its
    reader applies (texts.notifies, someone to send to). Send-test (prueba) events always
    go through it: their receipt waits for the WhatsApp sink's outcome."""

    def needs(event: Event) -> bool:
        return event.prueba or (texts.notifies(event) and bool(recipients(event)))

    return needs


def _safe_decode(data: bytes) -> Event | None:
    try:
        return decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def dead_letter_json(dl: DeadLetter) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(dl)
    out.pop("event", None)
    return out
