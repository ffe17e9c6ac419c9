"""Capped exponential backoff with full jitter.

Every reconnecting or retrying component uses the same schedule: the n-th delay
(n = 0, 1, ...) is drawn uniformly from ``[0, min(cap, first * factor**n)]``
("full jitter", see the AWS architecture blog post *Exponential Backoff And
Jitter*). Full jitter spreads the retries of many clients that lost the same
server at the same moment, so they do not all come back in lock-step.

Usage::

    for delay in delays(0.5, 30.0):
        try:
            await connect()
        except TransientError:
            await trio.sleep(delay)
            continue
        break

A fresh iterator is a reset: call :func:`delays` again after a success.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Protocol


class Uniform(Protocol):
    """Anything with ``uniform(a, b)``: the :mod:`random` module or a seeded ``Random``."""

    def uniform(self, a: float, b: float) -> float: ...


def ceilings(first: float, cap: float, *, factor: float = 2.0) -> Iterator[float]:
    """The upper bounds of the schedule without jitter: first, first*factor, ... cap, cap, ..."""
    if first <= 0 or cap <= 0:
        raise ValueError("first and cap must be positive")
    if factor < 1:
        raise ValueError("factor must be >= 1")
    ceiling = min(first, cap)
    while True:
        yield ceiling
        # Stop multiplying once capped: no overflow however long we retry.
        ceiling = cap if ceiling >= cap else min(cap, ceiling * factor)


def delays(
    first: float,
    cap: float,
    *,
    factor: float = 2.0,
    floor: float = 0.0,
    flat: int = 0,
    rng: Uniform = random,
) -> Iterator[float]:
    """Yield delays in seconds, forever: ``uniform(floor, min(cap, first * factor**n))``.

    ``first`` is the ceiling of the first delay, ``cap`` the largest ceiling.
    ``floor`` is the shortest delay (an operator's configured retry interval), and the
    first ``flat`` delays are exactly ``floor``: a blip is retried at that pace before
    the schedule grows. Pass a seeded ``random.Random`` as ``rng`` for reproducible tests.
    """
    for _ in range(flat):
        yield floor
    for ceiling in ceilings(first, cap, factor=factor):
        yield rng.uniform(floor, max(floor, ceiling))
