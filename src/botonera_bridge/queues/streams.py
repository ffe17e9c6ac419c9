"""A durable queue: a Redis stream with one consumer group per reader, and a
bounded in-memory fallback while Redis is away.

Guarantees:
- ``append`` returns a :class:`Receipt` per item; it is *safe* once the item is
  in the Redis stream, or, on the memory fallback, once every group finished it.
- Each group reads and acknowledges independently; entries a group has not
  acknowledged are never trimmed.
- When Redis returns, memory entries move into the stream in order, tagged with
  the groups that already finished them (those skip them).
- Memory full: ``append`` waits (the caller stops acknowledging MQTT); nothing
  is dropped.
- Pending entries of a dead consumer are reclaimed with XAUTOCLAIM; an entry
  delivered more than ``max_deliveries`` times is handed to ``on_poison``.
- Every command has the client's deadline; a timeout, a lost connection, an
  error reply to a write (OOM, READONLY, NOGROUP) or a reply of the wrong shape
  is a failure: the link goes down, an append goes to memory, an ack is kept
  and sent again. A command that timed out may still have run once Redis wakes
  up: an XREADGROUP whose reply never came leaves entries pending for this
  consumer, so after every recovery each group re-reads its own pending
  entries (those it is not delivering); an append that timed out may be in the
  stream *and* in memory, so it can be delivered twice, with the same event
  (the sinks' Idempotency-Key is the event id).

Cost per item at a steady rate (the bench's "CPU per message"): the append script
also reads the new entries for every group whose reader is waiting (XREADGROUP
inside the script: same consumer-group semantics, the entries go to our PEL), and
hands them to those readers in memory; a reader polls Redis itself only when it
may be behind (start, a full reader, a poll period without local appends, entries
appended by another process). Stream acks are sent in batches ``ACK_DELAY`` later
while ``run_maintenance`` runs (a crash in that window re-delivers those entries:
at least once, as before). One round trip per appended batch instead of five.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, ParamSpec, Protocol, TypeVar

import trio

from ..errors import FencedError, RedisError, RedisReplyError
from .link import RedisLink
from .redis_client import Arg, Redis

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")
# what indexing or decoding a reply of the wrong shape raises
REPLY_SHAPE_ERRORS: Final = (TypeError, ValueError, IndexError, KeyError, AttributeError)


def _reply_shape(
    fn: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """A reply of an unexpected shape (a hostile or broken server) is a RedisError."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await fn(*args, **kwargs)
        except REPLY_SHAPE_ERRORS as exc:
            raise RedisError(f"unexpected Redis reply in {fn.__name__}: {exc!r}") from exc

    return wrapper


DEDUP_TTL: Final = 86400  # seconds a dedup key is remembered in Redis
MEMORY_DEDUP: Final = 20000  # recent dedup keys remembered in memory
RECLAIM_IDLE_MS: Final = 60000  # a pending entry idle this long belongs to a dead consumer
TOUCH_AFTER: Final = 20.0  # seconds: refresh idle time of our own in-flight entries
MAX_DELIVERIES: Final = 10
MIGRATION_WAIT: Final = 5.0  # seconds sinks get to finish memory entries when Redis returns
ACK_DELAY: Final = 0.02  # seconds stream acks wait to be sent together
POLL_MS: Final = 1000  # a caught-up reader checks Redis itself this often

# One round trip, atomic: refuse everything when a fence is given (KEYS[2], the MQTT
# session's lease, see ha.py) and another replica's token is there (ARGV[2] is ours; an
# absent lease, e.g. after a Redis restart, was taken by nobody); remember each item's
# dedup key; skip a re-delivered item (key prefixed "?") whose key was already there;
# append the rest; then read what is new for the groups whose reader waits.
# ARGV: ttl, fence token ("" without a fence), consumer, n, n x (group, count), then
# (key, data, skip) per item. Returns {ids, reply of each XREADGROUP}.
_APPEND_LUA: Final = """
if KEYS[2] then
  local holder = redis.call('GET', KEYS[2])
  if holder and holder ~= ARGV[2] then
    return redis.error_reply('FENCED the session lease is held by another replica')
  end
end
local out = {}
local ngroups = tonumber(ARGV[4])
for i = 5 + 2 * ngroups, #ARGV, 3 do
  local ok = true
  local k = ARGV[i]
  if string.sub(k, 1, 1) == '?' then
    ok = redis.call('SET', string.sub(k, 2), '1', 'NX', 'EX', ARGV[1])
  elseif k ~= '' then
    redis.call('SET', k, '1', 'EX', ARGV[1])
  end
  if ok then
    out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'd', ARGV[i + 1], 's', ARGV[i + 2])
  else
    out[#out + 1] = false
  end
end
local result = {out}
for g = 0, ngroups - 1 do
  result[#result + 1] = redis.pcall('XREADGROUP', 'GROUP', ARGV[5 + 2 * g], ARGV[3],
    'COUNT', ARGV[6 + 2 * g], 'STREAMS', KEYS[1], '>')
end
return result
"""


class Receipt:
    """Tells when an appended item is safe to acknowledge upstream."""

    __slots__ = ("_event",)

    def __init__(self, event: trio.Event | None) -> None:
        self._event = event

    @property
    def safe(self) -> bool:
        return self._event is None or self._event.is_set()

    async def wait(self) -> None:
        if self._event is not None:
            await self._event.wait()


SAFE: Final = Receipt(None)


class Fence(Protocol):
    """An MQTT session lease (ha.py): appends under it succeed only while Redis holds
    ``token`` at ``key``; ``valid()`` is the local check used without Redis."""

    @property
    def key(self) -> str: ...

    @property
    def token(self) -> str: ...

    def valid(self) -> bool: ...

    def refused(self) -> None:
        """Told when messages were dropped unacknowledged because of this fence."""


@dataclass(eq=False)
class _Mem:
    id: str
    data: bytes
    done_by: set[str]
    taken_by: set[str] = field(default_factory=set)
    finished: trio.Event = field(default_factory=trio.Event)


@dataclass
class Item:
    id: str  # stream id, or "m-N" while in memory
    data: bytes


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
        self.reclaim_idle_ms = reclaim_idle_ms
        self.link = link
        self.key = key
        self.groups = tuple(groups)
        self.consumer = consumer
        self.memory_limit = memory_limit
        self.dedup_prefix = dedup_prefix
        self.on_poison = on_poison
        self._mem: OrderedDict[str, _Mem] = OrderedDict()
        self._mem_seq = 0
        self._unread: dict[str, deque[_Mem]] = {g: deque() for g in self.groups}
        self._reclaimed: dict[str, deque[Item]] = {g: deque() for g in self.groups}
        self._inflight: dict[str, dict[str, float]] = {g: {} for g in self.groups}
        self._pel_cursor: dict[str, str | None] = dict.fromkeys(self.groups, "0")
        self._unsent_acks: dict[str, list[str]] = {g: [] for g in self.groups}
        # read-through (see the module docstring), per group
        self._want: dict[str, int] = dict.fromkeys(self.groups, 0)  # a waiting reader's count
        self._pushing: dict[str, int] = dict.fromkeys(self.groups, 0)  # scripts reading for it
        self._pushed: dict[str, deque[Item]] = {g: deque() for g in self.groups}
        self._arrived: dict[str, trio.Event] = {g: trio.Event() for g in self.groups}
        self._behind: dict[str, bool] = dict.fromkeys(self.groups, True)
        self._acks_later: dict[str, list[str]] = {g: [] for g in self.groups}
        self._ack_due = trio.Event()
        self._acks_batched = False  # run_maintenance is running: it sends deferred acks
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = trio.Lock()
        self._wakeup = trio.Event()
        self._space = trio.Event()
        self.appended = 0  # items this process added (the counter invariant's input)
        self.skipped: dict[str, int] = {}  # of those, how many each group skips (append's skip)
        self._groups_ready = False
        self._had_groups = False
        self._sha = ""
        self._reading: set[trio.CancelScope] = set()
        link.on_recovery(self._on_recovery)
        link.on_down(self._abandon_reads)

    # -- introspection ---------------------------------------------------------------------
    @property
    def memory_items(self) -> int:
        return len(self._mem)

    def memory_depth(self, group: str) -> int:
        return sum(1 for m in self._mem.values() if group not in m.done_by)

    def inflight(self, group: str) -> int:
        return len(self._inflight[group])

    # -- producing ---------------------------------------------------------------------------
    async def append(
        self,
        items: Sequence[tuple[bytes, str]],
        *,
        skip: str = "",
        skips: Sequence[str] | None = None,
        fence: Fence | None = None,
    ) -> list[Receipt]:
        """Append (data, dedup_key) pairs in order. Every non-empty key is remembered; a key
        written ``"?key"`` marks a re-delivery, dropped (and reported safe) when the key was
        seen before. Only re-deliveries are checked: a panel that reuses an id after a reboot
        must never lose a fresh alarm. ``skip``: comma-separated groups that must not see
        these items; ``skips``: the same per item. A group skipped by every item of a batch
        is not even woken (its reader acknowledges them on its next poll); how many items
        each group skipped is counted in ``skipped``. Waits while the memory fallback is
        full. ``fence``: raise FencedError, appending nothing, unless this replica still
        holds that session lease."""
        try:  # uncontended: no scheduler pass (the append's round trip checkpoints)
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            fresh: list[tuple[bytes, str]] = []
            fresh_skips: list[str] = []
            out: list[Receipt | None] = []
            for i, (data, key) in enumerate(items):
                if key.startswith("?") and key[1:] in self._seen:
                    out.append(SAFE)
                    continue
                fresh.append((data, key))
                fresh_skips.append(skips[i] if skips is not None else skip)
                out.append(None)
            receipts = await self._append_locked(fresh, fresh_skips, fence)
            it = iter(receipts)
            result = [r if r is not None else next(it) for r in out]
            for _, key in fresh:
                if key:
                    self._remember(key.removeprefix("?"))
            return result
        finally:
            self._lock.release()

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        if len(self._seen) > MEMORY_DEDUP:
            self._seen.popitem(last=False)

    async def _append_locked(
        self, items: list[tuple[bytes, str]], skips: list[str], fence: Fence | None = None
    ) -> list[Receipt]:
        if not items:
            return []
        if fence is not None and not fence.valid():
            raise FencedError(f"{self.key}: not appending, session lease {fence.key} lost")
        if self.link.up:
            try:
                if self._mem:
                    await self._migrate_locked()
                self.appended += await self._xadd(
                    items, skips if any(skips) else (), fence, read_through=True
                )
                return [SAFE] * len(items)
            except RedisError as exc:
                self.link.down(exc)
            if fence is not None and not fence.valid():  # checked again: the append may be late
                raise FencedError(f"{self.key}: not appending, session lease {fence.key} lost")
        receipts = []
        for (data, _), skip in zip(items, skips, strict=True):
            while len(self._mem) >= self.memory_limit:
                log.warning(
                    "%s memory fallback full (%d items): upstream acknowledgements paused",
                    self.key,
                    self.memory_limit,
                )
                self._space = trio.Event()
                self._lock.release()
                try:
                    await self._space.wait()
                finally:
                    await self._lock.acquire()
            self._mem_seq += 1
            self.appended += 1
            done = {g for g in skip.split(",") if g}
            for g in done:
                self.skipped[g] = self.skipped.get(g, 0) + 1
            m = _Mem(id=f"m-{self._mem_seq}", data=data, done_by=done)
            self._mem[m.id] = m
            for g in self.groups:
                if g not in done:
                    self._unread[g].append(m)
            receipts.append(Receipt(m.finished))
        self._wake()
        return receipts

    @_reply_shape
    async def _xadd(
        self,
        items: Sequence[tuple[bytes, str]],
        skips: Sequence[str] = (),
        fence: Fence | None = None,
        *,
        read_through: bool = False,
    ) -> int:
        """Run the append script; returns how many items were added (re-deliveries dropped).
        Raises FencedError when ``fence`` no longer holds its token. ``read_through``: also
        read the new entries for the groups whose reader waits."""
        redis = self.link.redis
        assert redis is not None
        # groups skipped by every item: not woken (their reader acks them on its next poll)
        unwanted = (
            set.intersection(*({g for g in sk.split(",") if g} for sk in skips))
            if skips and read_through else set()
        )  # fmt: skip
        reads = [
            (g, self._want[g]) for g in self.groups if read_through and self._groups_ready
            and self._want[g] > 0 and g not in unwanted
        ]  # fmt: skip
        for g in self.groups:  # new entries a reader will not get handed: it must look
            if not any(g == r for r, _ in reads):
                self._behind[g] = True
        keys = [self.key, fence.key] if fence is not None else [self.key]
        # layout of _APPEND_LUA's ARGV: ttl, fence token, consumer, n, n x (group, count)
        args: list[Arg] = [
            DEDUP_TTL,
            fence.token if fence is not None else "",
            self.consumer,
            len(reads),
        ]
        for g, want in reads:
            args += [g, want]
            self._want[g] = 0  # taken: the reader waits for this script's answer
            self._pushing[g] += 1
        ok = False
        try:
            ids, *replies = await self._run_append(redis, keys, args, items, skips)
            if read_through and skips:  # count what each group skips (not on migration)
                for i, sk in zip(ids, skips, strict=True):
                    if i is not None and sk:
                        for g in sk.split(","):
                            self.skipped[g] = self.skipped.get(g, 0) + 1
            for (g, want), reply in zip(reads, replies, strict=True):
                if isinstance(reply, RedisReplyError):  # NOGROUP: the reader sorts it out
                    self._behind[g] = True
                    continue
                entries = _entries(reply)
                if len(entries) >= want:
                    self._behind[g] = True  # maybe more there
                if entries:
                    self._pushed[g].extend(await self._accept(g, entries))
            ok = True
        finally:
            for g, _ in reads:
                self._pushing[g] -= 1
                if not ok:  # read or not, the reader finds out from Redis
                    self._behind[g] = True
                self._arrived[g].set()
        return sum(1 for i in ids if i is not None)

    async def _run_append(
        self,
        redis: Redis,
        keys: list[str],
        args: list[Arg],
        items: Sequence[tuple[bytes, str]],
        skips: Sequence[str],
    ) -> list[Any]:
        for i, (data, key) in enumerate(items):
            if key.startswith("?"):
                key = f"?{self.dedup_prefix}{key[1:]}"
            elif key:
                key = f"{self.dedup_prefix}{key}"
            args += [key, data, skips[i] if skips else ""]
        if not self._sha:
            self._sha = (await redis.execute("SCRIPT", "LOAD", _APPEND_LUA)).decode()
        try:
            try:
                ids = await self._script(redis, ["EVALSHA", self._sha, len(keys), *keys, *args])
            except RedisReplyError as exc:
                if exc.code != "NOSCRIPT":
                    raise
                self._sha = ""
                ids = await self._script(redis, ["EVAL", _APPEND_LUA, len(keys), *keys, *args])
        except RedisReplyError as exc:
            if exc.code == "FENCED":
                raise FencedError(f"{self.key}: {exc}") from exc
            raise
        result: list[Any] = ids
        return result

    async def _script(self, redis: Redis, command: list[Arg]) -> Any:
        """Run the append script; with Sentinel, wait for a replica in the same round trip."""
        wait = redis.replication_wait()
        if wait is None:
            return await redis.execute(*command)
        reply, acked = await redis.pipeline([command, wait])
        if isinstance(reply, RedisReplyError):
            raise reply
        redis.replicated(acked)
        return reply

    def _abandon_reads(self) -> None:
        # what such a read took stays pending for us: re-read after the recovery
        for scope in self._reading:
            scope.cancel()
        for ev in self._arrived.values():  # readers waiting for a hand-over look again now
            ev.set()

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()
        for ev in self._arrived.values():
            ev.set()

    # -- recovery ----------------------------------------------------------------------------
    async def _on_recovery(self) -> None:
        await self._ensure_groups(force=True)
        await self._flush_acks()
        # Entries a group is delivering right now from memory: let it finish (bounded) so
        # the stream copy is marked done for that group instead of delivered twice. Appends
        # keep flowing into memory meanwhile (the lock is not held): intake never stalls.
        with trio.move_on_after(MIGRATION_WAIT):
            # polled: a rare recovery-time wait on sinks' progress, bounded above
            while any(m.taken_by - m.done_by for m in self._mem.values()):  # noqa: ASYNC110
                await trio.sleep(0.05)
        async with self._lock:
            await self._migrate_locked()
        await self._flush_acks()
        # A read that timed out may have run after all: its entries wait in our own pending
        # list, unseen. Re-read that list (skipping what is being delivered) before ">".
        for g in self.groups:
            self._pel_cursor[g] = "0"
        self._wake()  # caught-up readers too

    async def _migrate_locked(self) -> None:
        """Move memory entries into the stream, in order; finished groups skip them."""
        pending = list(self._mem.values())
        if not pending:
            return
        for start in range(0, len(pending), 500):
            chunk = pending[start : start + 500]
            await self._xadd(
                [(m.data, "") for m in chunk],
                [",".join(sorted(m.done_by)) for m in chunk],
            )
            for m in chunk:  # per chunk: a failure later must not add these twice
                self._mem.pop(m.id, None)
                m.finished.set()
        log.warning("%s: moved %d memory items into the Redis stream", self.key, len(pending))
        for g in self.groups:
            self._behind[g] = True
            self._unread[g].clear()
            for mid in [i for i in self._inflight[g] if i.startswith("m-")]:
                del self._inflight[g][mid]
        self._space.set()

    @_reply_shape
    async def _ensure_groups(self, *, force: bool = False) -> None:
        if self._groups_ready and not force:
            return
        redis = self.link.redis
        assert redis is not None
        replies = await redis.pipeline(
            [["XGROUP", "CREATE", self.key, g, "0", "MKSTREAM"] for g in self.groups]
        )
        created = []
        for g, r in zip(self.groups, replies, strict=True):
            if isinstance(r, RedisReplyError):
                if r.code != "BUSYGROUP":
                    raise r
            else:
                created.append(g)
        if created and self._had_groups:
            log.warning(
                "%s: consumer groups %s were missing (Redis restarted empty?) and were "
                "recreated; possible data loss of entries Redis had not persisted",
                self.key,
                ",".join(created),
            )
        self._groups_ready = self._had_groups = True

    async def _flush_acks(self) -> None:
        redis = self.link.redis
        assert redis is not None
        for g, ids in self._unsent_acks.items():
            if ids:
                sent = list(ids)
                await redis.execute("XACK", self.key, g, *sent)
                _forget(ids, sent)

    # -- consuming ---------------------------------------------------------------------------
    async def read(self, group: str, count: int, block_ms: int = POLL_MS) -> list[Item]:
        """Wait for up to ``count`` items for ``group`` (memory first, then the stream).
        ``block_ms``: how long a caught-up reader waits for local appends before it
        checks Redis itself (entries appended by another process)."""
        while True:
            mem = self._unread[group]
            if mem:
                taken: list[Item] = []
                while mem and len(taken) < count:
                    m = mem.popleft()
                    if m.id in self._mem and group not in m.done_by:
                        m.taken_by.add(group)
                        self._inflight[group][m.id] = time.monotonic()
                        taken.append(Item(m.id, m.data))
                if taken:
                    return taken
                continue
            if self._reclaimed[group]:
                rq = self._reclaimed[group]
                return [rq.popleft() for _ in range(min(count, len(rq)))]
            pushed = self._pushed[group]
            if pushed:
                return [pushed.popleft() for _ in range(min(count, len(pushed)))]
            if not self.link.up:
                wake = self._wakeup
                changed = self.link.changed
                async with trio.open_nursery() as n:

                    async def _wait(
                        ev: trio.Event, scope: trio.CancelScope = n.cancel_scope
                    ) -> None:
                        await ev.wait()
                        scope.cancel()

                    n.start_soon(_wait, wake)
                    n.start_soon(_wait, changed)
                continue
            if self._pushing[group] or (
                not self._behind[group] and self._pel_cursor[group] is None
            ):
                # caught up (own pending entries read too): the next local append hands
                # entries over; poll now and then
                self._want[group] = count
                arrived = self._arrived[group] = trio.Event()
                try:
                    with trio.move_on_after(block_ms / 1000):
                        await arrived.wait()
                finally:
                    self._want[group] = 0
                if not arrived.is_set():
                    self._behind[group] = True  # entries appended by someone else?
                continue
            try:
                # A read is abandoned as soon as the link goes down (another task's command
                # timed out): memory items must not wait out the command's deadline.
                with trio.CancelScope() as reading:
                    self._reading.add(reading)
                    try:
                        items = await self._xread(group, count)
                    finally:
                        self._reading.discard(reading)
                if reading.cancelled_caught:
                    continue
            except RedisReplyError as exc:
                if exc.code == "NOGROUP":
                    self._groups_ready = False
                    try:
                        await self._ensure_groups()
                    except RedisError as exc2:
                        self.link.down(exc2)
                    continue
                self.link.down(exc)
                continue
            except RedisError as exc:
                self.link.down(exc)
                continue
            if items:
                return items

    @_reply_shape
    async def _xread(self, group: str, count: int) -> list[Item]:
        redis = self.link.redis
        assert redis is not None
        await self._ensure_groups()
        cursor = self._pel_cursor[group]
        args: list[str | int] = ["XREADGROUP", "GROUP", group, self.consumer, "COUNT", count]
        reply = await redis.execute(*args, "STREAMS", self.key, cursor or ">")
        entries = _entries(reply)
        if cursor is None and len(entries) < count:
            self._behind[group] = False
        if cursor is not None:
            # Our own pending entries (a restart with the same consumer name), paged by id.
            if not entries:
                self._pel_cursor[group] = None
                return []
            self._pel_cursor[group] = entries[-1][0]
            busy = self._inflight[group]
            unsent = set(self._unsent_acks[group]) | set(self._acks_later[group])
            entries = [e for e in entries if e[0] not in busy and e[0] not in unsent]
            if entries:
                entries = await self._drop_poison(group, entries)
        return await self._accept(group, entries)

    async def _drop_poison(
        self, group: str, entries: list[tuple[str, dict[bytes, bytes]]]
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Entries delivered too often without an ack (they crash us?) go to ``on_poison``."""
        if self.on_poison is None:
            return entries
        redis = self.link.redis
        assert redis is not None
        counts = await self._delivery_counts(group, [e[0] for e in entries])
        keep = []
        for eid, fields in entries:
            n = counts.get(eid, 0)
            if n > MAX_DELIVERIES:
                await self.on_poison(group, Item(eid, fields.get(b"d", b"")), n)
                await redis.execute("XACK", self.key, group, eid)
            else:
                keep.append((eid, fields))
        return keep

    async def _accept(
        self, group: str, entries: list[tuple[str, dict[bytes, bytes]]]
    ) -> list[Item]:
        out: list[Item] = []
        skip_ids: list[str] = []
        for eid, fields in entries:
            skips = fields.get(b"s", b"").decode(errors="replace")
            data = fields.get(b"d")
            if data is None or (skips and group in skips.split(",")):
                skip_ids.append(eid)
                continue
            out.append(Item(eid, data))
        if skip_ids:
            if self._acks_batched:
                self._ack_soon(group, skip_ids)
            else:
                redis = self.link.redis
                assert redis is not None
                await redis.execute("XACK", self.key, group, *skip_ids)
        # only now in flight: had the XACK failed, these stay pending, re-read after recovery
        now = time.monotonic()
        for item in out:
            self._inflight[group][item.id] = now
        return out

    def release(self, group: str) -> int:
        """The consumer of ``group`` starts again (its task crashed and is restarted):
        what this process handed it and it never acknowledged is handed out again, in
        order: memory items first, then our own pending stream entries. Returns how many."""
        inflight = self._inflight[group]
        released = len(inflight)
        mem = [self._mem[i] for i in inflight if i.startswith("m-") and i in self._mem]
        mem.sort(key=lambda m: int(m.id[2:]))
        for m in reversed(mem):
            if group not in m.done_by:
                m.taken_by.discard(group)
                self._unread[group].appendleft(m)
        inflight.clear()
        self._reclaimed[group].clear()  # read again below, with our other pending entries
        self._pushed[group].clear()
        self._pel_cursor[group] = "0"
        self._wake()
        return released

    async def ack(self, group: str, ids: Sequence[str]) -> None:
        stream_ids = []
        for i in ids:
            self._inflight[group].pop(i, None)
            if i.startswith("m-"):
                m = self._mem.get(i)
                if m is None:
                    continue
                m.done_by.add(group)
                if m.done_by.issuperset(self.groups):
                    del self._mem[i]
                    m.finished.set()
                    self._space.set()
            else:
                stream_ids.append(i)
        if not stream_ids:
            return
        unsent = self._unsent_acks[group]
        if not self.link.up:
            unsent += stream_ids
            return
        if self._acks_batched:
            self._ack_soon(group, stream_ids)
            return
        redis = self.link.redis
        assert redis is not None
        sent = unsent + stream_ids if unsent else stream_ids  # one left from an outage, too
        try:
            await redis.execute("XACK", self.key, group, *sent)
        except RedisError as exc:  # kept: the XACK may not have run; sent again later
            unsent += stream_ids
            self.link.down(exc)
            return
        if unsent:
            _forget(unsent, sent)

    def _ack_soon(self, group: str, ids: list[str]) -> None:
        self._acks_later[group] += ids
        self._ack_due.set()

    async def _send_acks(self) -> None:
        """Every group's deferred acks in one round trip. They stay in ``_acks_later``
        until sent (a re-read of our pending entries meanwhile must not hand them out)."""
        batch = {g: list(ids) for g, ids in self._acks_later.items() if ids}
        if not batch:
            return
        if self.link.up:
            redis = self.link.redis
            assert redis is not None
            try:
                replies = await redis.pipeline(
                    [["XACK", self.key, g, *ids] for g, ids in batch.items()]
                )
            except RedisError as exc:
                self.link.down(exc)
            else:
                refused = {
                    g for g, r in zip(batch, replies, strict=True)
                    if isinstance(r, RedisReplyError)
                }  # fmt: skip
                for g, ids in batch.items():
                    if g not in refused:
                        _forget(self._acks_later[g], ids)
                if not refused:
                    return
                # an error reply is a failure too: those acks are kept and sent on recovery
                batch = {g: batch[g] for g in refused}
                self.link.down(RedisError(f"{self.key}: XACK refused for {sorted(refused)}"))
        for g, ids in batch.items():  # sent on recovery
            _forget(self._acks_later[g], ids)
            self._unsent_acks[g] += ids

    async def _run_acks(self) -> None:
        self._acks_batched = True
        try:
            while True:
                await self._ack_due.wait()
                await trio.sleep(ACK_DELAY)  # let the acks of this moment gather
                self._ack_due = trio.Event()
                await self._send_acks()
        finally:
            self._acks_batched = False
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self._send_acks()

    # -- maintenance -------------------------------------------------------------------------
    async def maintain(self) -> None:
        """One maintenance pass: reclaim dead consumers' entries, keep ours fresh, trim."""
        if not self.link.up:
            return
        redis = self.link.redis
        assert redis is not None
        try:
            await self._ensure_groups()
            now = time.monotonic()
            for g in self.groups:
                stale = [
                    i
                    for i, t in self._inflight[g].items()
                    if now - t > TOUCH_AFTER and "-" in i and not i.startswith("m-")
                ]
                if stale:
                    await redis.execute("XCLAIM", self.key, g, self.consumer, 0, *stale, "JUSTID")
                    for i in stale:
                        self._inflight[g][i] = now
                await self._reclaim(g)
            await self._trim()
        except RedisError as exc:
            self.link.down(exc)

    @_reply_shape
    async def take_over(self, consumer: str, limit: int = 1000) -> int:
        """Claim at once (up to ``limit`` per group) the pending entries of ``consumer``,
        known dead (ha.py adopted its MQTT session), instead of waiting for them to sit
        idle ``reclaim_idle_ms``. Returns how many were taken. Raises RedisError."""
        if not self.link.up or consumer == self.consumer:
            return 0
        redis = self.link.redis
        assert redis is not None
        taken = 0
        for g in self.groups:
            pending = await redis.execute("XPENDING", self.key, g, "-", "+", limit, consumer)
            ids = [r[0].decode() for r in pending or []]
            if not ids:
                continue
            reply = await redis.execute("XCLAIM", self.key, g, self.consumer, 0, *ids)
            entries = [e for e in _entry_list(reply) if e[0] not in self._inflight[g]]
            keep = await self._drop_poison(g, entries) if entries else []
            self._reclaimed[g].extend(await self._accept(g, keep))
            taken += len(keep)
        if taken:
            log.warning("%s: took over %d pending entries of %s", self.key, taken, consumer)
            self._wake()
        return taken

    @_reply_shape
    async def _reclaim(self, group: str) -> None:
        redis = self.link.redis
        assert redis is not None
        reply = await redis.execute(
            "XAUTOCLAIM", self.key, group, self.consumer, self.reclaim_idle_ms, "0-0", "COUNT", 200
        )
        entries = [e for e in _entry_list(reply[1]) if e[0] not in self._inflight[group]]
        if not entries:
            return
        keep = await self._drop_poison(group, entries)
        log.warning("%s/%s: reclaimed %d entries of a dead consumer", self.key, group, len(keep))
        self._reclaimed[group].extend(await self._accept(group, keep))
        self._wake()

    @_reply_shape
    async def _delivery_counts(self, group: str, ids: list[str]) -> dict[str, int]:
        redis = self.link.redis
        assert redis is not None
        reply = await redis.execute("XPENDING", self.key, group, ids[0], ids[-1], len(ids) + 1000)
        return {r[0].decode(): int(r[3]) for r in reply}

    @_reply_shape
    async def _trim(self) -> None:
        """Drop entries every group has acknowledged; never an unacknowledged one."""
        redis = self.link.redis
        assert redis is not None
        groups = await redis.execute("XINFO", "GROUPS", self.key)
        floor: str | None = None
        for g in groups:
            info = _pairs(g)
            if info.get(b"name", b"").decode() not in self.groups:
                continue
            pending = await redis.execute("XPENDING", self.key, info[b"name"])
            candidate = pending[1].decode() if pending[0] else info[b"last-delivered-id"].decode()
            if floor is None or _id_key(candidate) < _id_key(floor):
                floor = candidate
        if floor and floor != "0-0":
            await redis.execute("XTRIM", self.key, "MINID", floor)

    async def depth(self, group: str) -> int:
        """Items not yet finished by ``group`` (undelivered + in flight)."""
        n = self.memory_depth(group)
        if not self.link.up:
            return n
        redis = self.link.redis
        assert redis is not None
        try:
            for g in await redis.execute("XINFO", "GROUPS", self.key):
                info = _pairs(g)
                if info.get(b"name") == group.encode():
                    lag = info.get(b"lag")
                    pending = int(info[b"pending"]) - len(self._acks_later[group])
                    return n + max(0, pending) + (int(lag) if lag is not None else 0)
        except RedisReplyError:
            return n
        except RedisError as exc:
            self.link.down(exc)
        except REPLY_SHAPE_ERRORS as exc:
            self.link.down(RedisError(f"unexpected XINFO GROUPS reply: {exc!r}"))
        return n

    async def run_maintenance(self, period: float = 5.0) -> None:
        """Maintenance every ``period`` s; meanwhile stream acks go out in batches."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_acks)
            while True:
                await trio.sleep(period)
                await self.maintain()


def _forget(ids: list[str], sent: Sequence[str]) -> None:
    """Remove what was acknowledged; ids added meanwhile (another task) stay."""
    done = set(sent)
    ids[:] = [i for i in ids if i not in done]


def _pairs(flat: list[Any]) -> dict[bytes, Any]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _entry_list(raw: list[Any] | None) -> list[tuple[str, dict[bytes, bytes]]]:
    out = []
    for eid, flat in raw or []:
        if flat is None:  # deleted while pending
            continue
        out.append((eid.decode(), _pairs(flat)))
    return out


def _entries(reply: list[Any] | None) -> list[tuple[str, dict[bytes, bytes]]]:
    if not reply:
        return []
    _, raw = reply[0]
    return _entry_list(raw)
