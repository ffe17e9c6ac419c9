"""The bounded in-memory implementation of a durable stream, used while Redis is away.

An item stays until every group finished it (acknowledged, or skipped at append); its
:class:`~.base.Receipt` is safe then, or once it was moved into the Redis stream
(:meth:`MemoryStream.moved`). At ``limit`` items :meth:`MemoryStream.put` refuses and
the caller waits in :meth:`MemoryStream.wait_room`: nothing is ever dropped.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence, Set
from dataclasses import dataclass, field

import trio

from .base import Item, Origin, Receipt


@dataclass(eq=False, slots=True)
class _Entry:
    seq: int
    id: str  # str(seq): what readers see and acknowledge
    data: bytes
    done_by: set[str]
    taken_by: set[str] = field(default_factory=set)
    finished: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True, slots=True)
class Backlog:
    """A memory item on its way into the Redis stream."""

    id: str
    data: bytes
    done_by: frozenset[str]  # groups that finished it: they skip the stream copy


class MemoryStream:
    """Implements :class:`~.base.Stream`."""

    def __init__(self, key: str, groups: tuple[str, ...], *, limit: int) -> None:
        self.key = key
        self.groups = groups
        self.limit = limit
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._seq = 0
        self._unread: dict[str, deque[_Entry]] = {g: deque() for g in self.groups}
        self._inflight: dict[str, dict[str, _Entry]] = {g: {} for g in self.groups}
        # handed out, then moved into Redis before the group acknowledged them: their
        # ack has nothing left to do here, and must not reach the Redis stream either
        self._moved: dict[str, set[str]] = {g: set() for g in self.groups}
        # anything here a reader may take or acknowledge: False is the switch-over's fast
        # path while Redis is up (a plain attribute: no call per read or ack)
        self.active = False
        self._wakeup = trio.Event()
        self._room = trio.Event()

    # -- introspection ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def unfinished(self, group: str) -> int:
        return sum(1 for m in self._entries.values() if group not in m.done_by)

    async def depth(self, group: str) -> int:
        return self.unfinished(group)

    def inflight(self, group: str) -> int:
        return len(self._inflight[group])

    def _update_active(self) -> None:
        self.active = (
            bool(self._entries) or any(self._inflight.values()) or any(self._moved.values())
        )

    def owns(self, group: str, item_id: str) -> bool:
        """Whether ``item_id``, acknowledged by ``group``, is one this memory handed out."""
        return (
            item_id in self._inflight[group]
            or item_id in self._moved[group]
            or (item_id in self._entries)
        )

    def delivering(self) -> bool:
        """Whether a group holds an item it has not finished yet."""
        return any(m.taken_by - m.done_by for m in self._entries.values())

    # -- producing ---------------------------------------------------------------------------
    @property
    def room(self) -> int:
        return self.limit - len(self._entries)

    async def wait_room(self) -> None:
        """Until an item left (finished by every group, or moved into Redis)."""
        if self.room > 0:
            return
        self._room = trio.Event()
        await self._room.wait()

    def put(self, data: bytes, skip: Set[str]) -> Receipt:
        """Append one item (the caller checked ``room``, and calls ``wake`` after a
        batch); ``skip``: groups that must not see it. Its receipt is safe once every
        group finished it."""
        assert self.room > 0, "memory stream full: wait_room() first"
        self._seq += 1
        m = _Entry(self._seq, str(self._seq), data, done_by=set(skip))
        self._entries[m.id] = m
        self.active = True
        for g in self.groups:
            if g not in m.done_by:
                self._unread[g].append(m)
        if m.done_by.issuperset(self.groups):  # no group wants it: safe at once
            self._finish(m)
            self._update_active()
        return Receipt(m.finished)

    # -- consuming ---------------------------------------------------------------------------
    def take(self, group: str, count: int) -> list[Item]:
        unread = self._unread[group]
        taken: list[Item] = []
        while unread and len(taken) < count:
            m = unread.popleft()
            if m.id in self._entries and group not in m.done_by:
                m.taken_by.add(group)
                self._inflight[group][m.id] = m
                taken.append(Item(m.id, m.data, Origin.MEMORY))
        return taken

    async def read(self, group: str, count: int, block_ms: int) -> list[Item]:
        items = self.take(group, count)
        if items:
            return items
        wakeup = self._wakeup
        with trio.move_on_after(block_ms / 1000):
            await wakeup.wait()
        return self.take(group, count)

    async def ack(self, group: str, ids: Sequence[str]) -> None:
        inflight, moved = self._inflight[group], self._moved[group]
        for i in ids:
            inflight.pop(i, None)
            moved.discard(i)
            m = self._entries.get(i)
            if m is None:
                continue
            m.done_by.add(group)
            if m.done_by.issuperset(self.groups):
                self._finish(m)
        self._update_active()

    def _finish(self, m: _Entry) -> None:
        self._entries.pop(m.id, None)
        m.finished.set()
        self._room.set()

    def release(self, group: str) -> int:
        """What ``group`` was handed and did not finish is handed out again first, in order."""
        inflight = self._inflight[group]
        released = len(inflight)
        for m in sorted(inflight.values(), key=lambda m: m.seq, reverse=True):
            if m.id in self._entries and group not in m.done_by:
                m.taken_by.discard(group)
                self._unread[group].appendleft(m)
        inflight.clear()
        self._moved[group].clear()
        self._update_active()
        self.wake()
        return released

    def wake(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()

    # -- moving into Redis -------------------------------------------------------------------
    def backlog(self) -> list[Backlog]:
        """Every item, in order, with the groups that finished it."""
        return [Backlog(m.id, m.data, frozenset(m.done_by)) for m in self._entries.values()]

    def moved(self, ids: Sequence[str]) -> None:
        """These items are in the Redis stream now: safe, and gone from here."""
        for i in ids:
            m = self._entries.pop(i, None)
            if m is not None:
                m.finished.set()
        gone = set(ids)
        for g in self.groups:
            self._unread[g] = deque(m for m in self._unread[g] if m.id not in gone)
            inflight = self._inflight[g]
            for i in gone.intersection(inflight):
                del inflight[i]
                self._moved[g].add(i)
        self._update_active()
        self._room.set()
