"""Build the zipapp from shiv.toml (shiv ignores config files, so we pass flags)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

root = Path(__file__).resolve().parent.parent
conf = tomllib.loads((root / "shiv.toml").read_text())
out = root / conf["output"]
out.parent.mkdir(parents=True, exist_ok=True)
cmd = [
    sys.executable,
    "-m",
    "shiv",
    "-e",
    conf["entry_point"],
    "-o",
    str(out),
    "-p",
    conf["python"],
]
if conf.get("reproducible"):
    cmd.append("--reproducible")
if conf.get("compile_pyc"):
    cmd.append("--compile-pyc")
cmd += ["--quiet", *conf["packages"]]
print("+", " ".join(cmd), flush=True)
subprocess.run(cmd, check=True, cwd=root)
print(f"built {out.relative_to(root)} ({out.stat().st_size // 1024} KiB)")
