"""Small persistent hashes (devices, open alarms) with an in-memory mirror.

Reads are served from the mirror; writes update it at once and are written
through to Redis. While Redis is away, writes wait in order and are flushed
when it returns, so a restart after an outage still sees the latest state.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from typing import Final, Protocol

log = logging.getLogger(__name__)

FLUSH_CHUNK: Final = 256  # fields per HSET/HDEL of one flush


class HashBackend(Protocol):
    async def hgetall(self, key: str) -> dict[str, bytes]: ...
    async def hset(self, key: str, mapping: dict[str, bytes]) -> None: ...
    async def hdel(self, key: str, fields: list[str]) -> None: ...


class HashStore:
    """One Redis hash mirrored in memory. ``backend`` None means memory only."""

    def __init__(self, key: str, backend: HashBackend | None) -> None:
        self.key = key
        self._backend = backend
        self.data: dict[str, bytes] = {}
        # field -> value (None = delete); newest write wins, order kept for flushing
        self._unsynced: OrderedDict[str, bytes | None] = OrderedDict()

    async def load(self) -> None:
        """Fill the mirror from Redis; keeps whatever is in memory if Redis is away."""
        if self._backend is None:
            return
        try:
            stored = await self._backend.hgetall(self.key)
        except Exception as exc:  # noqa: BLE001 - any Redis failure means: start from memory
            log.warning("cannot load %s from Redis, starting empty: %s", self.key, exc)
            return
        stored.update({k: v for k, v in self.data.items()})
        self.data = stored

    def get(self, field: str) -> bytes | None:
        return self.data.get(field)

    def set(self, field: str, value: bytes) -> None:
        self.data[field] = value
        self._unsynced[field] = value
        self._unsynced.move_to_end(field)

    def delete(self, field: str) -> None:
        self.data.pop(field, None)
        self._unsynced[field] = None
        self._unsynced.move_to_end(field)

    @property
    def dirty(self) -> int:
        return len(self._unsynced)

    async def flush(self) -> bool:
        """Write pending changes to Redis. True when nothing is left to write."""
        if self._backend is None:
            self._unsynced.clear()
            return True
        while self._unsynced:
            # in chunks: thousands of changed fields encoded in one step would hold the loop
            batch = dict(itertools.islice(self._unsynced.items(), FLUSH_CHUNK))
            sets = {k: v for k, v in batch.items() if v is not None}
            dels = [k for k, v in batch.items() if v is None]
            try:
                if sets:
                    await self._backend.hset(self.key, sets)
                if dels:
                    await self._backend.hdel(self.key, dels)
            except Exception as exc:  # noqa: BLE001 - kept for the next flush
                log.debug("flush of %s deferred: %s", self.key, exc)
                return False
            changed = False
            for k, v in batch.items():
                if self._unsynced.get(k, b"\0sentinel") is v:
                    del self._unsynced[k]
                else:  # changed while written: left for the next flush
                    changed = True
            if changed:
                return False
        return True
