"""The Redis implementation of a durable stream: one consumer group per reader.

Guarantees:
- Each group reads and acknowledges independently; entries a group has not
  acknowledged are never trimmed.
- Pending entries of a dead consumer are reclaimed with XAUTOCLAIM; an entry
  delivered more than ``MAX_DELIVERIES`` times is handed to ``on_poison``.
- Every command has the client's deadline; a timeout, a lost connection, an error
  reply to a write (OOM, READONLY, NOGROUP) or a reply of the wrong shape is a
  failure: the link goes down, an ack is kept and sent again after the recovery
  (:meth:`RedisStream.recover`). A command that timed out may still have run once
  Redis wakes up: an XREADGROUP whose reply never came leaves entries pending for
  this consumer, so after every recovery each group re-reads its own pending entries
  (those it is not delivering).

Cost per item at a steady rate (the bench's "CPU per message"): the append script
also reads the new entries for every group whose reader is waiting (XREADGROUP
inside the script: same consumer-group semantics, the entries go to our PEL),
acknowledges there those the group skips (a message no WhatsApp contact needs costs
the WhatsApp group no read, no ack and no wake-up of its reader), and hands the rest to
those readers in memory; a reader polls Redis itself only when it may be behind
(start, a full reader, a poll period without local appends, entries appended by
another process). Acks are sent in batches ``ACK_DELAY`` later while
:meth:`RedisStream.run_maintenance` runs (a crash in that window re-delivers those
entries: at least once, as before). One round trip per appended batch instead of five.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence, Set
from typing import Any, Final

import trio

from ..errors import FencedError, RedisError, RedisReplyError
from .base import Fence, Item
from .link import RedisLink
from .redis_client import Arg, Redis
from .replies import (
    REPLY_SHAPE_ERRORS,
    Entry,
    entry_list,
    id_key,
    pairs,
    reply_shape,
    stream_entries,
)

log = logging.getLogger(__name__)

DEDUP_TTL: Final = 86400  # seconds a dedup key is remembered in Redis
RECLAIM_IDLE_MS: Final = 60000  # a pending entry idle this long belongs to a dead consumer
TOUCH_AFTER: Final = 20.0  # seconds: refresh idle time of our own in-flight entries
MAX_DELIVERIES: Final = 10
ACK_DELAY: Final = 0.02  # seconds stream acks wait to be sent together
FINAL_ACKS_WAIT: Final = 2.0  # seconds the last acks get at shutdown

# One round trip, atomic: refuse everything when a fence is given (KEYS[2], the MQTT
# session's lease, see ha.py) and another replica's token is there (ARGV[2] is ours; an
# absent lease, e.g. after a Redis restart, was taken by nobody); remember each item's
# dedup key; skip a re-delivered item (key prefixed "?") whose key was already there;
# append the rest; then read what is new for the groups whose reader waits, and
# acknowledge at once what such a read got that its group skips (an entry's "s" field).
# ARGV: ttl, fence token ("" without a fence), consumer, n, n x (group, count), then
# (key, data, skip) per item. Returns {ids, then per group: its XREADGROUP reply without
# the skipped entries, and how many entries it read}.
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
  local group = ARGV[5 + 2 * g]
  local reply = redis.pcall('XREADGROUP', 'GROUP', group, ARGV[3],
    'COUNT', ARGV[6 + 2 * g], 'STREAMS', KEYS[1], '>')
  local n = 0
  if type(reply) == 'table' and not reply.err and reply[1] then
    local needle = ',' .. group .. ','
    local keep, skipped = {}, {}
    n = #reply[1][2]
    for _, e in ipairs(reply[1][2]) do
      local f, skip = e[2], false
      if type(f) == 'table' then
        for j = 1, #f - 1, 2 do
          if f[j] == 's' then
            skip = string.find(',' .. f[j + 1] .. ',', needle, 1, true) ~= nil
          end
        end
      end
      if skip then skipped[#skipped + 1] = e[1] else keep[#keep + 1] = e end
    end
    if #skipped > 0 then  -- pcall: an error must not fail the appends above
      redis.pcall('XACK', KEYS[1], group, unpack(skipped))
    end
    reply[1][2] = keep
  end
  result[#result + 1] = reply
  result[#result + 1] = n
end
return result
"""
# An entry's "s" field: the groups that skip it, comma-separated (the stored format).
SKIP_SEPARATOR: Final = ","


class RedisStream:
    """Implements :class:`~.base.Stream` on a Redis stream; every call needs the link up
    (the switch-over in :mod:`.streams` sees to it) and raises RedisError otherwise."""

    def __init__(
        self,
        link: RedisLink,
        key: str,
        groups: tuple[str, ...],
        *,
        consumer: str,
        dedup_prefix: str,
        on_poison: Callable[[str, Item, int], Awaitable[None]] | None,
        reclaim_idle_ms: int,
    ) -> None:
        self.link, self.key, self.groups, self.consumer = link, key, groups, consumer
        self.dedup_prefix, self.on_poison = dedup_prefix, on_poison
        self.reclaim_idle_ms = reclaim_idle_ms
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
        self._acks_batched = False  # run_acks is running: it sends deferred acks
        self._groups_ready = False
        self._had_groups = False
        self._sha = ""
        self._reading: set[trio.CancelScope] = set()
        self._depth_error = ""
        link.on_down(self._abandon_reads)

    def _redis(self) -> Redis:
        redis = self.link.redis
        if redis is None:
            raise RedisError(f"{self.key}: no Redis configured")
        return redis

    def inflight(self, group: str) -> int:
        return len(self._inflight[group])

    # -- producing ---------------------------------------------------------------------------
    @reply_shape
    async def append(
        self,
        items: Sequence[tuple[bytes, str]],
        skips: Sequence[Set[str]] = (),
        fence: Fence | None = None,
        *,
        read_through: bool = True,
    ) -> list[bytes | None]:
        """Run the append script on (data, dedup key) pairs; returns the new entries' ids
        (None for a re-delivery whose key was seen: not added). ``skips``: per item, the
        groups that must not see it (empty: none). Raises FencedError when ``fence`` no
        longer holds its token. ``read_through``: also read the new entries for the groups
        whose reader waits."""
        redis = self._redis()
        # groups skipped by every item: read too (the script acknowledges what they skip),
        # but their reader keeps waiting unless the read got something for it
        unwanted = set(skips[0]).intersection(*skips[1:]) if skips and read_through else set()
        reads = [
            (g, self._want[g]) for g in self.groups
            if read_through and self._groups_ready and self._want[g] > 0
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
            if g not in unwanted:
                self._want[g] = 0  # taken: the reader waits for this script's answer
            self._pushing[g] += 1
        ok = False
        try:
            ids, *replies = await self._run_append(redis, keys, args, items, skips)
            if not isinstance(ids, list) or len(ids) != len(items):
                raise RedisError(f"{self.key}: unexpected append script reply {ids!r:.200}")
            if len(replies) != 2 * len(reads):
                raise RedisError(f"{self.key}: unexpected append script reply {replies!r:.200}")
            for (g, want), reply, nread in zip(reads, replies[::2], replies[1::2], strict=True):
                if isinstance(reply, RedisReplyError):  # NOGROUP: the reader recreates it
                    self._behind[g] = True
                    continue
                if nread >= want:
                    self._behind[g] = True  # maybe more there
                entries = stream_entries(reply)
                if entries:
                    self._pushed[g].extend(await self._accept(g, entries))
            ok = True
        finally:
            for g, _ in reads:
                self._pushing[g] -= 1
                if not ok:  # read or not, the reader finds out from Redis
                    self._behind[g] = True
                if g not in unwanted or self._behind[g] or self._pushed[g]:
                    self._arrived[g].set()
        return ids

    async def _run_append(
        self,
        redis: Redis,
        keys: list[str],
        args: list[Arg],
        items: Sequence[tuple[bytes, str]],
        skips: Sequence[Set[str]],
    ) -> list[Any]:
        for i, (data, key) in enumerate(items):
            if key.startswith("?"):
                key = f"?{self.dedup_prefix}{key[1:]}"
            elif key:
                key = f"{self.dedup_prefix}{key}"
            args += [key, data, SKIP_SEPARATOR.join(skips[i]) if skips else ""]
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
        self.wake()  # readers waiting for a hand-over look again now

    def wake(self) -> None:
        for ev in self._arrived.values():
            ev.set()

    # -- recovery ----------------------------------------------------------------------------
    async def recover(self) -> None:
        """Redis answers again: recreate missing groups, send the acks kept meanwhile."""
        await self._ensure_groups(force=True)
        await self._flush_acks()

    async def resume(self) -> None:
        """After the memory items moved in: send the acks kept meanwhile, and re-read our
        own pending entries (a read that timed out may have run after all: its entries
        wait there, unseen) before new ones."""
        await self._flush_acks()
        for g in self.groups:
            self._pel_cursor[g] = "0"
        self.wake()

    @reply_shape
    async def _ensure_groups(self, *, force: bool = False) -> None:
        if self._groups_ready and not force:
            return
        replies = await self._redis().pipeline(
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
        redis = self._redis()
        for g, ids in self._unsent_acks.items():
            if ids:
                sent = list(ids)
                await redis.execute("XACK", self.key, g, *sent)
                _forget(ids, sent)

    # -- consuming ---------------------------------------------------------------------------
    def take(self, group: str, count: int) -> list[Item]:
        """Reclaimed entries first, then those an append read for this group."""
        for ready in (self._reclaimed[group], self._pushed[group]):
            if ready:
                return [ready.popleft() for _ in range(min(count, len(ready)))]
        return []

    async def read(self, group: str, count: int, block_ms: int) -> list[Item]:
        """One look for ``group``: what is ready, else a read from Redis, else (caught up)
        a wait of up to ``block_ms`` for a local append to hand entries over. [] when
        nothing came, or the link went down meanwhile (the read is abandoned at once:
        memory items must not wait out the command's deadline)."""
        items = self.take(group, count)
        if items or not self.link.up:
            return items
        if self._pushing[group] or (not self._behind[group] and self._pel_cursor[group] is None):
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
            return self.take(group, count)
        try:
            with trio.CancelScope() as reading:
                self._reading.add(reading)
                try:
                    return await self._xread(group, count)
                finally:
                    self._reading.discard(reading)
        except RedisReplyError as exc:
            if exc.code != "NOGROUP":
                self.link.down(exc)
                return []
            self._groups_ready = False
            try:
                await self._ensure_groups()
            except RedisError as exc2:
                self.link.down(exc2)
        except RedisError as exc:
            self.link.down(exc)
        return []

    @reply_shape
    async def _xread(self, group: str, count: int) -> list[Item]:
        redis = self._redis()
        await self._ensure_groups()
        cursor = self._pel_cursor[group]
        args: list[str | int] = ["XREADGROUP", "GROUP", group, self.consumer, "COUNT", count]
        reply = await redis.execute(*args, "STREAMS", self.key, cursor or ">")
        entries = stream_entries(reply)
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

    async def _drop_poison(self, group: str, entries: list[Entry]) -> list[Entry]:
        """Entries delivered too often without an ack (they crash us?) go to ``on_poison``."""
        if self.on_poison is None:
            return entries
        redis = self._redis()
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

    async def _accept(self, group: str, entries: list[Entry]) -> list[Item]:
        out: list[Item] = []
        skip_ids: list[str] = []
        for eid, fields in entries:
            skips = fields.get(b"s", b"").decode(errors="replace")
            data = fields.get(b"d")
            if data is None or (skips and group in skips.split(SKIP_SEPARATOR)):
                skip_ids.append(eid)
                continue
            out.append(Item(eid, data))
        if skip_ids:
            if self._acks_batched:
                self._ack_soon(group, skip_ids)
            else:
                await self._redis().execute("XACK", self.key, group, *skip_ids)
        # only now in flight: had the XACK failed, these stay pending, re-read after recovery
        now = time.monotonic()
        for item in out:
            self._inflight[group][item.id] = now
        return out

    def release(self, group: str) -> int:
        """What this process handed ``group`` and it never acknowledged: our own pending
        entries, read again at once. Returns how many."""
        inflight = self._inflight[group]
        released = len(inflight)
        inflight.clear()
        self._reclaimed[group].clear()  # read again below, with our other pending entries
        self._pushed[group].clear()
        self._pel_cursor[group] = "0"
        self.wake()
        return released

    async def ack(self, group: str, ids: Sequence[str]) -> None:
        inflight = self._inflight[group]
        for i in ids:
            inflight.pop(i, None)
        unsent = self._unsent_acks[group]
        if not self.link.up:
            unsent += ids
            return
        if self._acks_batched:
            self._ack_soon(group, ids)
            return
        sent = [*unsent, *ids] if unsent else ids  # one left from an outage, too
        try:
            await self._redis().execute("XACK", self.key, group, *sent)
        except RedisError as exc:  # kept: the XACK may not have run; sent again later
            unsent += ids
            self.link.down(exc)
            return
        if unsent:
            _forget(unsent, sent)

    def _ack_soon(self, group: str, ids: Sequence[str]) -> None:
        self._acks_later[group] += ids
        self._ack_due.set()

    async def _send_acks(self) -> None:
        """Every group's deferred acks in one round trip. They stay in ``_acks_later``
        until sent (a re-read of our pending entries meanwhile must not hand them out)."""
        batch = {g: list(ids) for g, ids in self._acks_later.items() if ids}
        if not batch:
            return
        if self.link.up:
            try:
                replies = await self._redis().pipeline(
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

    async def run_acks(self) -> None:
        """Send acks in batches, ``ACK_DELAY`` after the first of a batch, until cancelled."""
        self._acks_batched = True
        try:
            while True:
                await self._ack_due.wait()
                await trio.sleep(ACK_DELAY)  # let the acks of this moment gather
                self._ack_due = trio.Event()
                await self._send_acks()
        finally:
            self._acks_batched = False
            with trio.CancelScope(shield=True), trio.move_on_after(FINAL_ACKS_WAIT):
                await self._send_acks()
            left = sum(len(ids) for ids in self._acks_later.values())
            if left:  # still pending in Redis: delivered again after the restart
                log.warning("%s: %d acks not sent before stopping", self.key, left)

    # -- maintenance -------------------------------------------------------------------------
    async def maintain(self) -> None:
        """One maintenance pass: reclaim dead consumers' entries, keep ours fresh, trim."""
        if not self.link.up:
            return
        try:
            redis = self._redis()
            await self._ensure_groups()
            now = time.monotonic()
            for g in self.groups:
                stale = [i for i, t in self._inflight[g].items() if now - t > TOUCH_AFTER]
                if stale:
                    await redis.execute("XCLAIM", self.key, g, self.consumer, 0, *stale, "JUSTID")
                    for i in stale:
                        self._inflight[g][i] = now
                await self._reclaim(g)
            await self._trim()
        except RedisError as exc:
            self.link.down(exc)

    @reply_shape
    async def take_over(self, consumer: str, limit: int = 1000) -> int:
        """Claim at once (up to ``limit`` per group) the pending entries of ``consumer``,
        known dead (ha.py adopted its MQTT session), instead of waiting for them to sit
        idle ``reclaim_idle_ms``. Returns how many were taken. Raises RedisError."""
        if not self.link.up or consumer == self.consumer:
            return 0
        redis = self._redis()
        taken = 0
        for g in self.groups:
            pending = await redis.execute("XPENDING", self.key, g, "-", "+", limit, consumer)
            ids = [r[0].decode() for r in pending or []]
            if not ids:
                continue
            reply = await redis.execute("XCLAIM", self.key, g, self.consumer, 0, *ids)
            entries = [e for e in entry_list(reply) if e[0] not in self._inflight[g]]
            keep = await self._drop_poison(g, entries) if entries else []
            self._reclaimed[g].extend(await self._accept(g, keep))
            taken += len(keep)
        if taken:
            log.warning("%s: took over %d pending entries of %s", self.key, taken, consumer)
            self.wake()
        return taken

    @reply_shape
    async def _reclaim(self, group: str) -> None:
        reply = await self._redis().execute(
            "XAUTOCLAIM", self.key, group, self.consumer, self.reclaim_idle_ms, "0-0", "COUNT", 200
        )
        entries = [e for e in entry_list(reply[1]) if e[0] not in self._inflight[group]]
        if not entries:
            return
        keep = await self._drop_poison(group, entries)
        log.warning("%s/%s: reclaimed %d entries of a dead consumer", self.key, group, len(keep))
        self._reclaimed[group].extend(await self._accept(group, keep))
        self.wake()

    @reply_shape
    async def _delivery_counts(self, group: str, ids: list[str]) -> dict[str, int]:
        reply = await self._redis().execute(
            "XPENDING", self.key, group, ids[0], ids[-1], len(ids) + 1000
        )
        return {r[0].decode(): int(r[3]) for r in reply}

    @reply_shape
    async def _trim(self) -> None:
        """Drop entries every group has acknowledged; never an unacknowledged one."""
        redis = self._redis()
        groups = await redis.execute("XINFO", "GROUPS", self.key)
        floor: str | None = None
        for g in groups:
            info = pairs(g)
            if info.get(b"name", b"").decode() not in self.groups:
                continue
            pending = await redis.execute("XPENDING", self.key, info[b"name"])
            candidate = pending[1].decode() if pending[0] else info[b"last-delivered-id"].decode()
            if floor is None or id_key(candidate) < id_key(floor):
                floor = candidate
        if floor and floor != "0-0":
            await redis.execute("XTRIM", self.key, "MINID", floor)

    async def depth(self, group: str) -> int:
        """Entries ``group`` has not finished (undelivered + in flight); 0 while the link
        is down or the stream does not exist yet."""
        if not self.link.up:
            return 0
        try:
            for g in await self._redis().execute("XINFO", "GROUPS", self.key):
                info = pairs(g)
                if info.get(b"name") == group.encode():
                    lag = info.get(b"lag")
                    pending = int(info[b"pending"]) - len(self._acks_later[group])
                    return max(0, pending) + (int(lag) if lag is not None else 0)
        except RedisReplyError as exc:  # e.g. no such key before the first append
            if str(exc) != self._depth_error:  # once per distinct reply: polled every second
                self._depth_error = str(exc)
                log.info("%s: depth of %s not known from Redis: %s", self.key, group, exc)
        except RedisError as exc:
            self.link.down(exc)
        except REPLY_SHAPE_ERRORS as exc:
            self.link.down(RedisError(f"unexpected XINFO GROUPS reply: {exc!r}"))
        return 0

    async def run_maintenance(self, period: float) -> None:
        """Maintenance every ``period`` s; meanwhile acks go out in batches."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.run_acks)
            while True:
                await trio.sleep(period)
                await self.maintain()


def _forget(ids: list[str], sent: Sequence[str]) -> None:
    """Remove what was acknowledged; ids added meanwhile (another task) stay."""
    done = set(sent)
    ids[:] = [i for i in ids if i not in done]
