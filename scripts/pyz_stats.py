"""The .pyz as a Raspberry Pi runs it: size, first-run extraction, warm start, idle RSS.

    python scripts/pyz_stats.py [dist/botonera-bridge.pyz]     (part of `make bench`)

Runs against a private mosquitto and the reference backend on loopback ports, with a
private SHIV_ROOT, and prints one Markdown table.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.backend import Backend  # noqa: E402
from tests.support.bridge import BridgeProc  # noqa: E402
from tests.support.procs import Mosquitto  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    # absolute: the bridge under test runs in its own working directory
    given = sys.argv[1] if len(sys.argv) > 1 else ROOT / "dist" / "botonera-bridge.pyz"
    pyz = Path(given).resolve()
    root = Path(tempfile.mkdtemp(prefix="bb-shiv-"))
    env = {"SHIV_ROOT": str(root)}
    t0 = time.monotonic()
    subprocess.run([str(pyz), "--version"], check=True, capture_output=True, env=env, timeout=120)
    first = time.monotonic() - t0
    extracted = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    walls, cpus = [], []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        subprocess.run([str(pyz), "--help"], check=True, capture_output=True, env=env, timeout=60)
        walls.append(time.monotonic() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    broker, backend = Mosquitto(persistence=False), Backend(quiet=True)
    bridge = None
    try:
        broker.start()
        backend.start()
        bridge = BridgeProc(
            mqtt_port=broker.port, backend_url=backend.url, argv=[str(pyz)], env=env
        ).start()
        time.sleep(5)  # idle: subscribed, status server up, nothing arriving
        idle = rss_kib(bridge.pid)
        bridge.terminate()
    finally:
        if bridge is not None:
            bridge.cleanup()
        backend.cleanup()
        broker.cleanup()
    print(f"| .pyz ({pyz.name}) | {pyz.stat().st_size / 1e6:.1f} MB |")
    print("|---|---|")
    print(f"| first run (extraction) | {first:.2f} s, {extracted / 1e6:.1f} MB under SHIV_ROOT |")
    print(f"| warm `--help` (best of 5) | {min(walls):.2f} s wall, {min(cpus):.2f} s CPU |")
    print(f"| idle RSS of `run` | {idle / 1024:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
