"""Must-show 1: a fresh clone needs nothing but `make demo` and `make test`.

The clone gets no virtualenv and no installed project: `make demo` must create `.venv`
from requirements.lock by itself. Inside the suite only the unit tests run in the clone
(`make test-fast`); CI's own `.ci/run` on a clean clone is the full-suite proof.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.bridge import ROOT

pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    """The environment of a user with no virtualenv active."""
    venv = os.environ.get("VIRTUAL_ENV", "")
    bin_dirs = {str(Path(sys.executable).parent)} | ({f"{venv}/bin"} if venv else set())
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p not in bin_dirs]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join([*path, "/usr/sbin"])
    return env


def test_fresh_clone_make_demo_then_tests(tmp_path: Path) -> None:
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("needs git and make")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (clone / ".venv").exists()
    env = _clean_env()
    demo = subprocess.run(
        ["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "El backend guardó" in demo.stdout
    assert demo.stdout.count("_bridge: id=") == 4
    assert (clone / ".venv" / ".installed-from-lock").is_file()
    fast = subprocess.run(
        ["make", "test-fast"], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    assert fast.returncode == 0, fast.stdout[-3000:] + fast.stderr[-3000:]
    assert " passed" in fast.stdout
    assert " failed" not in fast.stdout
