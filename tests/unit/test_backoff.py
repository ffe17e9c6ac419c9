"""Capped exponential backoff with full jitter."""

from __future__ import annotations

import itertools
import random

import pytest

from botonera_bridge.backoff import ceilings, delays


def test_ceilings_double_then_stay_at_the_cap() -> None:
    assert list(itertools.islice(ceilings(0.5, 5.0), 7)) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_first_above_cap_is_capped() -> None:
    assert list(itertools.islice(ceilings(10.0, 3.0), 2)) == [3.0, 3.0]


def test_full_jitter_stays_within_zero_and_the_ceiling() -> None:
    rng = random.Random(7)
    got = list(itertools.islice(delays(0.5, 30.0, rng=rng), 2000))
    bounds = list(itertools.islice(ceilings(0.5, 30.0), 2000))
    assert all(0.0 <= d <= c for d, c in zip(got, bounds, strict=True))
    late = got[100:]
    assert max(late) > 25.0  # jitter spans the whole range...
    assert min(late) < 5.0  # ...down to near zero
    assert 12.0 < sum(late) / len(late) < 18.0  # mean of uniform(0, 30)


def test_floor_and_flat_retries_come_first() -> None:
    got = list(itertools.islice(delays(6.0, 60.0, floor=3.0, flat=2, rng=random.Random(3)), 500))
    assert got[:2] == [3.0, 3.0]
    bounds = list(itertools.islice(ceilings(6.0, 60.0), 498))
    assert all(3.0 <= d <= c for d, c in zip(got[2:], bounds, strict=True))
    assert max(got) > 50.0


def test_seeded_rng_is_reproducible() -> None:
    a = list(itertools.islice(delays(1.0, 8.0, rng=random.Random(1)), 10))
    b = list(itertools.islice(delays(1.0, 8.0, rng=random.Random(1)), 10))
    assert a == b


def test_never_overflows_however_long_it_runs() -> None:
    it = ceilings(1.0, 60.0, factor=10.0)
    for _ in range(100_000):
        c = next(it)
    assert c == 60.0


@pytest.mark.parametrize(("first", "cap", "factor"), [(0, 1, 2), (1, 0, 2), (1, 1, 0.5)])
def test_rejects_nonsense(first: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        next(ceilings(first, cap, factor=factor))
