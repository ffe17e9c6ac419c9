"""heap.trim: safe to call at any time; on glibc it really calls malloc_trim."""

import platform

from botonera_bridge import heap


def test_trim_runs_and_reports_glibc() -> None:
    assert heap.trim() == (platform.libc_ver()[0] == "glibc")
    assert heap.trim() == heap.trim()  # idempotent


def test_fix_mmap_threshold_on_glibc_only() -> None:
    assert heap.fix_mmap_threshold() == (platform.libc_ver()[0] == "glibc")
