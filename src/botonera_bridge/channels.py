"""Memory-channel helpers shared by the tasks that work in batches."""

from __future__ import annotations

from typing import TypeVar

import trio

T = TypeVar("T")


def queued_behind(first: T, recv: trio.MemoryReceiveChannel[T], limit: int) -> list[T]:
    """``first`` and what is already queued behind it, up to ``limit`` items, without
    waiting: one wake-up handles everything that arrived meanwhile."""
    batch = [first]
    while len(batch) < limit:
        try:
            batch.append(recv.receive_nowait())
        except trio.WouldBlock:
            break
    return batch
