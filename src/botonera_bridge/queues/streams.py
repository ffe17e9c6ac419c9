"""A durable queue: the Redis stream while the link is up, the bounded memory stream
while Redis is away, and the switch-over between them (only here).

Guarantees:
- ``append`` returns a :class:`~.base.Receipt` per item; it is *safe* once the item is
  in the Redis stream, or, on the memory fallback, once every group finished it.
- An append that fails in Redis (an error, a timeout) marks the link down (its
  WARNING and metric, see :mod:`.link`) and goes to memory instead.
- When Redis returns, memory items move into the stream in order, tagged with the
  groups that already finished them (those skip them).
- Memory full: ``append`` waits (the caller stops acknowledging MQTT); nothing is
  dropped.
- An append that timed out may be in the stream *and* in memory, so it can be
  delivered twice, with the same event (the sinks' Idempotency-Key is the event id).

The two implementations behind one interface (:class:`~.base.Stream`):
:class:`~.redis_stream.RedisStream` and :class:`~.memory_stream.MemoryStream`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence, Set
from typing import TYPE_CHECKING, Final

import trio

from ..errors import FencedError, RedisError
from .base import SAFE, Fence, Item, Origin, Receipt, Stream
from .link import RedisLink
from .memory_stream import MemoryStream
from .redis_stream import MAX_DELIVERIES, RECLAIM_IDLE_MS, RedisStream

__all__ = [
    "MAX_DELIVERIES",
    "NO_SKIP",
    "SAFE",
    "DurableStream",
    "Fence",
    "Item",
    "Origin",
    "Receipt",
    "Stream",
]

log = logging.getLogger(__name__)

MEMORY_DEDUP: Final = 20000  # recent dedup keys remembered in memory
MIGRATION_WAIT: Final = 5.0  # seconds sinks get to finish memory entries when Redis returns
MIGRATION_CHUNK: Final = 500  # memory items per append script when they move into Redis
POLL_MS: Final = 1000  # a caught-up reader checks Redis itself this often
NO_SKIP: Final[frozenset[str]] = frozenset()


class DurableStream:
    def __init__(
        self,
        link: RedisLink,
        key: str,
        groups: Sequence[str],
        *,
        consumer: str,
        memory_limit: int,
        dedup_prefix: str = "",
        on_poison: Callable[[str, Item, int], Awaitable[None]] | None = None,
        reclaim_idle_ms: int = RECLAIM_IDLE_MS,
    ) -> None:
        self.link = link
        self.key = key
        self.groups = tuple(groups)
        self.redis = RedisStream(
            link,
            key,
            self.groups,
            consumer=consumer,
            dedup_prefix=dedup_prefix,
            on_poison=on_poison,
            reclaim_idle_ms=reclaim_idle_ms,
        )
        self.memory = MemoryStream(key, self.groups, limit=memory_limit)
        self._seen: OrderedDict[str, None] = OrderedDict()
        # one append (or migration) at a time: order is kept
        self._held = _Held(trio.Lock())
        self.appended = 0  # items this process added (the counter invariant's input)
        self.skipped: dict[str, int] = {}  # of those, how many each group skips (append's skip)
        # set from the move of memory into Redis until the link's recovery attempt ended
        self._recovering: trio.Event | None = None
        link.on_recovery(self._on_recovery)
        link.after_recovery(self._settled)
        link.on_change(self.memory.wake)  # a reader waiting on memory turns to Redis at once

    # -- introspection ---------------------------------------------------------------------
    @property
    def memory_items(self) -> int:
        return len(self.memory)

    def memory_depth(self, group: str) -> int:
        return self.memory.unfinished(group)

    def inflight(self, group: str) -> int:
        return self.memory.inflight(group) + self.redis.inflight(group)

    async def depth(self, group: str) -> int:
        """Items not yet finished by ``group`` (undelivered + in flight)."""
        return await self.memory.depth(group) + await self.redis.depth(group)

    # -- producing ---------------------------------------------------------------------------
    async def append(
        self,
        items: Sequence[tuple[bytes, str]],
        *,
        skips: Sequence[Set[str]] | None = None,
        fence: Fence | None = None,
    ) -> list[Receipt]:
        """Append (data, dedup_key) pairs in order. Every non-empty key is remembered; a key
        written ``"?key"`` marks a re-delivery, dropped (and reported safe) when the key was
        seen before. Only re-deliveries are checked: a panel that reuses an id after a reboot
        must never lose a fresh alarm. ``skips``: per item, the groups that must not see it.
        A group skipped by every item of a batch is not even woken (on Redis the append
        acknowledges them for it; in memory its reader does on its next poll); how many
        items each group skipped is counted in ``skipped``. Waits while the memory
        fallback is full. ``fence``: raise FencedError, appending nothing, unless this
        replica still holds that session lease."""
        out: list[Receipt | None] = []
        fresh: list[tuple[bytes, str]] = []
        fresh_skips: list[Set[str]] = []
        todo: deque[tuple[tuple[bytes, str], Set[str]]] = deque()
        async with self._held:
            for i, (data, key) in enumerate(items):
                if key.startswith("?") and key[1:] in self._seen:
                    out.append(SAFE)
                    continue
                fresh.append((data, key))
                fresh_skips.append(skips[i] if skips is not None else NO_SKIP)
                out.append(None)
            if not fresh:
                return [r or SAFE for r in out]
            if fence is not None and not fence.valid():
                raise FencedError(f"{self.key}: not appending, session lease {fence.key} lost")
            receipts = await self._append_redis(fresh, fresh_skips, fence)
            if receipts is None:
                if fence is not None and not fence.valid():  # again: the append may be late
                    raise FencedError(f"{self.key}: not appending, session lease {fence.key} lost")
                todo.extend(zip(fresh, fresh_skips, strict=True))
                receipts = self._put_memory(todo)
        while todo:  # the rest waits (not holding the lock): for room, or for the recovery
            if self._recovering is not None:
                await self._recovering.wait()
            else:
                log.warning(
                    "%s memory fallback full (%d items): upstream acknowledgements paused",
                    self.key,
                    self.memory.limit,
                )
                await self.memory.wait_room()
            async with self._held:
                rest = list(todo)
                done = await self._append_redis([i for i, _ in rest], [s for _, s in rest], fence)
                if done is not None:
                    receipts += done
                    todo.clear()
                else:
                    receipts += self._put_memory(todo)
        for _, key in fresh:
            if key:
                self._remember(key.removeprefix("?"))
        it = iter(receipts)
        return [r if r is not None else next(it) for r in out]

    async def _append_redis(
        self,
        items: list[tuple[bytes, str]],
        skips: list[Set[str]],
        fence: Fence | None,
    ) -> list[Receipt] | None:
        """Append to the Redis stream (memory leftovers first, to keep the order): the
        items are safe. None: the link is down, or went down now (the items are not in).
        Once a recovery moved memory into Redis, appends go there before the link is up."""
        if not self.link.up and self._recovering is None:
            return None
        try:
            if self.memory.active:
                await self._migrate_locked()
            added = await self.redis.append(items, skips if any(skips) else (), fence)
        except RedisError as exc:
            self.link.down(exc)
            return None
        for entry_id, skip in zip(added, skips, strict=True):
            if entry_id is not None:  # else a re-delivery the script dropped
                self.appended += 1
                if skip:
                    self._count_skips(skip)
        return [SAFE] * len(items)

    def _put_memory(self, todo: deque[tuple[tuple[bytes, str], Set[str]]]) -> list[Receipt]:
        """Put items into memory, in order, while there is room; ``todo`` keeps the rest.
        Nothing while a recovery that moved memory into Redis is not settled: put now, an
        item would be read (memory first) before those moved, and Redis may be up soon."""
        receipts: list[Receipt] = []
        while todo and self.memory.room and self._recovering is None:
            (data, _), skip = todo.popleft()
            receipts.append(self.memory.put(data, skip))
            self.appended += 1
            if skip:
                self._count_skips(skip)
        self._wake()
        return receipts

    def _count_skips(self, skip: Set[str]) -> None:
        for g in skip:
            self.skipped[g] = self.skipped.get(g, 0) + 1

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        if len(self._seen) > MEMORY_DEDUP:
            self._seen.popitem(last=False)

    # -- recovery ----------------------------------------------------------------------------
    async def _on_recovery(self) -> None:
        await self.redis.recover()
        # Entries a group is delivering right now from memory: let it finish (bounded) so
        # the stream copy is marked done for that group instead of delivered twice. Appends
        # keep flowing into memory meanwhile (the lock is not held): intake never stalls.
        with trio.move_on_after(MIGRATION_WAIT):
            # polled: a rare recovery-time wait on sinks' progress, bounded above
            while self.memory.delivering():  # noqa: ASYNC110
                await trio.sleep(0.05)
        async with self._held:
            await self._migrate_locked()
            self._recovering = trio.Event()  # appends go to Redis now, never to memory
        await self.redis.resume()
        self._wake()

    def _settled(self) -> None:
        """The link's recovery attempt ended (up, or down again): appends go on."""
        if self._recovering is not None:
            self._recovering.set()
            self._recovering = None

    async def _migrate_locked(self) -> None:
        """Move memory items into the stream, in order; finished groups skip them."""
        backlog = self.memory.backlog()
        if not backlog:
            return
        for start in range(0, len(backlog), MIGRATION_CHUNK):
            chunk = backlog[start : start + MIGRATION_CHUNK]
            await self.redis.append(
                [(m.data, "") for m in chunk], [m.done_by for m in chunk], read_through=False
            )
            self.memory.moved([m.id for m in chunk])  # per chunk: never added twice
        log.warning("%s: moved %d memory items into the Redis stream", self.key, len(backlog))

    # -- consuming ---------------------------------------------------------------------------
    async def read(self, group: str, count: int, block_ms: int = POLL_MS) -> list[Item]:
        """Wait for up to ``count`` items for ``group`` (memory first, then the stream).
        ``block_ms``: how long a caught-up reader waits for local appends before it
        checks Redis itself (entries appended by another process)."""
        while True:
            items = self.memory.take(group, count) if self.memory.active else []
            if not items:
                if self.link.up:  # what is ready in Redis first, then a read there
                    items = await self.redis.read(group, count, block_ms)
                else:  # woken when the link flips
                    items = self.redis.take(group, count) or await self.memory.read(
                        group, count, block_ms
                    )
            if items:
                return items

    async def ack(self, group: str, ids: Sequence[str]) -> None:
        """``group`` finished these items: each goes to the implementation it came from."""
        memory = self.memory
        if not memory.active:  # the usual case: Redis up, nothing in memory
            await self.redis.ack(group, ids)
            return
        mine: list[str] = []
        theirs: list[str] = []
        for i in ids:
            (mine if memory.owns(group, i) else theirs).append(i)
        await memory.ack(group, mine)
        if theirs:
            await self.redis.ack(group, theirs)

    def release(self, group: str) -> int:
        """The consumer of ``group`` starts again (its task crashed and is restarted):
        what this process handed it and it never acknowledged is handed out again, in
        order: memory items first, then our own pending stream entries. Returns how many."""
        return self.memory.release(group) + self.redis.release(group)  # each wakes its readers

    def _wake(self) -> None:
        self.memory.wake()
        self.redis.wake()

    # -- Redis only ---------------------------------------------------------------------------
    async def take_over(self, consumer: str, limit: int = 1000) -> int:
        """See :meth:`RedisStream.take_over`."""
        return await self.redis.take_over(consumer, limit)

    async def maintain(self) -> None:
        """See :meth:`RedisStream.maintain`."""
        await self.redis.maintain()

    async def run_maintenance(self, period: float = 5.0) -> None:
        """Maintenance every ``period`` s; meanwhile stream acks go out in batches."""
        await self.redis.run_maintenance(period)


class _Held:
    """``async with`` a trio.Lock, without a scheduler pass when it is free (the
    append's round trip checkpoints anyway)."""

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


if TYPE_CHECKING:  # both implementations satisfy the one interface (checked by mypy)

    def _implementations(redis: RedisStream, memory: MemoryStream) -> tuple[Stream, Stream]:
        return redis, memory
