"""The outbox (events for the sinks) and the dead-letter store, on durable streams."""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import msgspec

from ..errors import RedisError, RedisReplyError
from ..messages import Event, decode_event, encode_event
from ..metrics import Metrics
from ..sinks import texts
from .link import RedisLink
from .streams import NO_SKIP, DurableStream, Fence, Item, Receipt

log = logging.getLogger(__name__)

GROUPS: Final = ("backend", "whatsapp")
MEMORY_DEAD_LIMIT: Final = 10000
MEMORY_DEAD_BYTES: Final = 16 << 20  # dead letters held in memory while Redis is away
DEAD_PAYLOAD_MAX: Final = 65536  # bytes of a payload kept (mqtt.max_payload)
DEAD_MAX: Final = 10000  # entries kept in the :dead stream (redis.dead_max)


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
    length: int = -1  # bytes of the original payload (only the first max_payload are kept)
    sha256: str = ""  # of the original payload


class DeadLetters:
    """The ``:dead`` stream, trimmed to ``dead_max`` entries (oldest first, counted); a
    memory list (at most ``dead_max`` entries and MEMORY_DEAD_BYTES) while Redis is away
    or refuses the write. Payloads are kept up to ``max_payload`` bytes, with the original
    length and sha256."""

    def __init__(
        self,
        link: RedisLink,
        key: str,
        metrics: Metrics | None = None,
        *,
        max_payload: int = DEAD_PAYLOAD_MAX,
        dead_max: int = DEAD_MAX,
    ) -> None:
        self.link = link
        self.key = key
        self._metrics = metrics
        self.max_payload = max_payload
        self.dead_max = dead_max
        self.memory: deque[DeadLetter] = deque()
        self.memory_bytes = 0
        self.trimmed = 0  # entries dropped by the bounds (Redis trim + memory)
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
        length: int | None = None,
        sha256: str | None = None,
    ) -> None:
        """``length``, ``sha256``: the original's, when ``payload`` was already cut."""
        if self._metrics is not None:
            self._metrics.dead_letters.labels(reason=reason).inc()
        length = len(payload) if length is None else length
        digest = hashlib.sha256(payload).hexdigest() if sha256 is None else sha256
        if len(payload) > self.max_payload:
            payload = payload[: self.max_payload]
        if length > len(payload):
            detail = f"{detail} (payload truncated to {len(payload)} of {length} bytes)"
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
            length=length,
            sha256=digest,
        )
        if self.link.up:
            try:
                await self._flush()  # anything parked in memory while Redis was away goes first
                await self._xadd([dl])
                return
            except RedisError as exc:
                self.link.down(exc)
                log.warning(
                    "dead letter %s (%s) not written to %s (%s): kept in memory until "
                    "Redis takes it",
                    reason,
                    digest[:12],
                    self.key,
                    exc,
                )
        self._keep(dl)

    def _keep(self, dl: DeadLetter) -> None:
        self.memory.append(dl)
        self.memory_bytes += _size(dl)
        dropped = 0
        while len(self.memory) > 1 and (
            self.memory_bytes > MEMORY_DEAD_BYTES or len(self.memory) > self.dead_max
        ):
            self.memory_bytes -= _size(self.memory.popleft())
            dropped += 1
        if dropped:
            self._count_trimmed(dropped, "memory")
        self._report_memory()

    def _report_memory(self) -> None:
        if self._metrics is not None:
            self._metrics.dead_letters_memory_bytes.set(self.memory_bytes)

    def _count_trimmed(self, n: int, where: str) -> None:
        if not self.trimmed:
            log.warning(
                "dead letters over their bound (%s): oldest dropped, counted in "
                "botonera_dead_letters_trimmed_total",
                f"{self.dead_max} entries in {self.key}"
                if where == "redis"
                else f"{MEMORY_DEAD_BYTES >> 20} MiB in memory",
            )
        self.trimmed += n
        if self._metrics is not None:
            self._metrics.dead_letters_trimmed.labels(where=where).inc(n)

    async def _xadd(self, items: Sequence[DeadLetter]) -> None:
        """Append and trim in one round trip. Raises on an error reply to any XADD (the
        ones refused are in ``exc.refused``; the others are in the stream)."""
        redis = self.link.redis
        assert redis is not None
        commands: list[list[bytes | str | int | float]] = [
            ["XADD", self.key, "*", "dl", self._encoder.encode(d)] for d in items
        ]
        commands.append(["XTRIM", self.key, "MAXLEN", self.dead_max])
        wait = redis.replication_wait()  # Sentinel: on a replica before it counts as kept
        if wait is not None:
            commands.append(wait)
        replies = await redis.pipeline(commands)
        if wait is not None:
            redis.replicated(replies.pop())
        trimmed = replies.pop()
        if isinstance(trimmed, int) and trimmed > 0:
            self._count_trimmed(trimmed, "redis")
        refused = [d for d, r in zip(items, replies, strict=True) if isinstance(r, RedisReplyError)]
        if refused:
            first = next(r for r in replies if isinstance(r, RedisReplyError))
            raise _Refused(str(first), refused)

    async def _flush(self) -> None:
        if not self.memory:
            return
        batch = list(self.memory)
        try:
            await self._xadd(batch)
        except _Refused as exc:  # keep only what Redis refused (no duplicates in :dead)
            self._forget(batch, keep=exc.refused)
            raise
        self._forget(batch)

    def _forget(self, written: list[DeadLetter], keep: Sequence[DeadLetter] = ()) -> None:
        gone = {id(d) for d in written} - {id(d) for d in keep}
        self.memory = deque(d for d in self.memory if id(d) not in gone)
        self.memory_bytes = sum(_size(d) for d in self.memory)
        self._report_memory()


class _Refused(RedisReplyError):
    """Redis answered some dead-letter XADDs with an error (OOM at maxmemory...)."""

    def __init__(self, message: str, refused: list[DeadLetter]) -> None:
        super().__init__(message)
        self.refused = refused


def _size(dl: DeadLetter) -> int:
    return len(dl.payload) + len(dl.detail) + len(dl.event) + 200


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
        needed_by: Mapping[str, Callable[[Event], bool]] | None = None,
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
        self.needed_by: dict[str, Callable[[Event], bool]] = dict(needed_by or {})

    async def append(
        self, events: Sequence[tuple[Event, str]], *, only: str = "", fence: Fence | None = None
    ) -> list[Receipt]:
        """Append (event, dedup key) pairs; see DurableStream.append. ``only``: one sink;
        ``fence``: the MQTT session lease they were received under (ha.py). A sink whose
        ``needed_by`` predicate says no skips the event (counted as skipped)."""
        others = frozenset(g for g in GROUPS if g != only) if only else NO_SKIP
        needs = self.needed_by
        skips = [
            others.union(g for g, need in needs.items() if not need(e)) if needs else others
            for e, _ in events
        ]
        before = dict(self.stream.skipped)
        receipts = await self.stream.append(
            [(encode_event(e), k) for e, k in events], skips=skips, fence=fence
        )
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
        """A new consumer for ``group``, called at each start of its sink: whatever an
        earlier one (a crashed run of the same sink) read and did not acknowledge is
        handed out again, so a restarted sink begins from a clean state."""
        released = self.stream.release(group)
        if released:
            log.warning("%s: %d unacknowledged entries handed out again", group, released)
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
                replies = await redis.pipeline(
                    [["HSET", key, group, outcome], ["EXPIRE", key, 3600], ["HGETALL", key]]
                )
                got = _receipt_outcomes(replies)
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


def _receipt_outcomes(replies: list[Any]) -> dict[str, str]:
    """The HGETALL of a send-test receipt; an error or odd reply is a Redis failure."""
    for r in replies:
        if isinstance(r, RedisReplyError):
            raise r
    flat = replies[-1]
    try:
        return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
    except (TypeError, AttributeError, IndexError, UnicodeDecodeError) as exc:
        raise RedisError(f"unexpected HGETALL reply: {exc!r}") from exc


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
