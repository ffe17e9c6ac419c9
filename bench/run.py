"""`make bench`: the bridge against Node-RED and a keep-alive Python forwarder, one invocation.

Per target and run: a fresh private mosquitto (defaults: 20 in-flight QoS 1
messages per client; queued messages kept for persistent sessions) and, for the
bridge, a fresh private redis-server (AOF, everysec). Every target POSTs to the
same fast sink (bench/sink.py) and subscribes at QoS 1 with a persistent session
(clean_session=False, fixed client id).

Targets:
- ``bridge``: ``python -m botonera_bridge run``, the durable path (Redis outbox, PUBACK
  once the alarm is in Redis);
- ``nodered``: Node-RED 4 running bench/nodered/flow.json (mqtt in -> http request,
  keep-alive), installed by this script with npm into bench/.node-red (gitignored);
- ``naive``: bench/baselines/naive.py (paho loop_forever + requests.Session).

Measured per run (medians over --runs, default 3; ratios are computed per run, then
the median of the ratios is reported):
- burst: 20,000 alarms published at full speed while the target is subscribed;
  throughput = N / (last POST at the sink - first alarm published); CPU µs per message;
- steady: 500 msg/s for 20 s: latency (sink receive time - publish time) p50/p95/p99/max
  and CPU µs per message (the target's CPU from the first publish to the last POST / N);
- backlog: the target stops, the broker takes 10,000 alarms for its session, the target
  starts: time from the start to the last POST, and p99 of the arrival times;
- RSS idle (2 s after warm-up) and peak (sampled every 20 ms through everything);
- loss (alarms that never reached the sink) and duplicates, every phase.
Then: idle RSS with the status server on (package and .pyz), the .pyz warm start,
py-spy profiles of one bridge burst and of the steady mode, and bench/http_clients.py.

Quick before/after of one change: ``--only steady --targets bridge --runs 3`` (the
500 msg/s phase only) or ``--only idle`` (idle RSS with the status server on, package
and .pyz); both print medians and write nothing. ``BENCH_BRIDGE_ARGV`` replaces
``python -m botonera_bridge`` (e.g. ``env PYTHONPATH=old/src python -m botonera_bridge``
to run an older tree, or a wrapper with a Trio Instrument); ``--baseline OLD/src`` with
``--only`` runs an older tree as a second target in the same invocation, interleaved.

Bounded: every wait has a deadline, and only processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tests.support.bridge import BridgeProc  # noqa: E402
from tests.support.procs import Mosquitto, Redis, free_port, wait_port  # noqa: E402

from mqttpub import Publisher  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PYZ = ROOT / "dist" / "botonera-bridge.pyz"
NODE_RED_DIR = ROOT / "bench" / ".node-red"
NODE_RED_JS = NODE_RED_DIR / "node_modules" / "node-red" / "red.js"
NODE_RED_VERSION = "4"
BURST = 20_000
RATE = 500  # msg/s
RATE_SECONDS = 20
BACKLOG = 10_000
WARMUP = 50
DRAIN_TIMEOUT = 180.0  # seconds to wait for the sink to see everything
STALL = 20.0  # seconds without a new arrival after which the rest counts as lost
SAMPLE_EVERY = 0.02  # seconds between RSS samples


# -- the sink ------------------------------------------------------------------------------------


@dataclass
class Arrivals:
    got: dict[int, tuple[int, int]]  # seq -> (sent_ns, first recv_ns)
    duplicates: int
    lost: int


class Sink:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "sink.py"), "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    def _get(self, what: str) -> Any:
        with urllib.request.urlopen(f"{self.url}/_bench/{what}", timeout=30) as r:  # noqa: S310
            return json.loads(r.read())

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._get("stats")
        return result

    def dump(self) -> list[tuple[int, int, int]]:
        return [tuple(r) for r in self._get("dump")]

    def wait_seqs(self, seqs: range, timeout: float, *, settle: float = 0.0) -> Arrivals:
        """Collect records until every seq in ``seqs`` arrived (or ``timeout``: the rest is
        lost); then ``settle`` seconds more to count late duplicates."""
        want = set(seqs)
        got: dict[int, tuple[int, int]] = {}
        dups = 0
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        progress = time.monotonic()
        while True:
            before = len(got)
            for seq, sent, recv in self.dump():
                if seq in want:
                    if seq in got:
                        dups += 1
                    else:
                        got[seq] = (sent, recv)
            now = time.monotonic()
            if len(got) != before:
                progress = now
            elif now - progress > STALL and len(got) < len(want):
                return Arrivals(got, dups, len(want) - len(got))  # nothing more is coming
            if len(got) == len(want) and settle_until is None:
                settle_until = now + settle
            if settle_until is not None and now >= settle_until:
                return Arrivals(got, dups, 0)
            if now > deadline:
                return Arrivals(got, dups, len(want) - len(got))
            time.sleep(0.1)

    def late_copies(self, seqs: range, seconds: float) -> int:
        """After every seq arrived: how many more copies come within ``seconds``."""
        time.sleep(seconds)
        return sum(1 for seq, _, _ in self.dump() if seq in seqs)

    def wait_all(self, seqs: range, timeout: float) -> dict[int, tuple[int, int]]:
        a = self.wait_seqs(seqs, timeout)
        if a.lost:
            raise TimeoutError(f"sink saw {len(a.got)}/{len(seqs)} messages after {timeout}s")
        return a.got

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def sink_capacity(sink: Sink, seconds: float = 2.0) -> dict[str, float]:
    """Load the sink from 4 keep-alive connections, 64 pipelined POSTs each round.

    Reports the rate reached (a lower bound: this Python client is the slower side)
    and the sink's own CPU per request, whose inverse is its one-core capacity."""
    import socket

    body = b'{"tipo_mensaje":"alarmas","empresa":"cota","seq":-5,"sent_ns":0}'
    req = (
        b"POST /api/mqtt-alerts/process HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    socks = [socket.create_connection(("127.0.0.1", sink.port)) for _ in range(4)]
    before = sink.stats()
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for s in socks:
            s.sendall(req * 64)
        for s in socks:
            buf = b""
            while buf.count(b"HTTP/1.1 201") < 64:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("sink closed the load connection")
                buf += chunk
        n += 64 * len(socks)
    wall = time.perf_counter() - t0
    after = sink.stats()
    for s in socks:
        s.close()
    sink.dump()
    cpu = after["cpu_s"] - before["cpu_s"]
    return {"rate": n / wall, "cpu_us": cpu / n * 1e6, "capacity": n / cpu if cpu else float("inf")}


def publisher_rate(mosq: Mosquitto) -> dict[str, float]:
    """Publish a burst to mosquitto with nobody subscribed: msg/s until the last PUBACK,
    and mosquitto's own CPU per message."""
    broker = psutil.Process(mosq.pid)
    pub = Publisher(mosq.port, f"pubrate-{os.getpid()}", topic="nobody/listens")
    c0 = cpu_s(broker)
    t0 = time.perf_counter()
    pub.burst(range(BURST))
    if not pub.wait_acked(60):
        raise TimeoutError("publisher: PUBACKs missing")
    rate = BURST / (time.perf_counter() - t0)
    broker_us = (cpu_s(broker) - c0) / BURST * 1e6
    pub.close()
    return {"rate": rate, "broker_us": broker_us}


def redis_capacity(n: int = 20_000) -> dict[str, float]:
    """redis-server's CPU per XADD (AOF everysec), pipelined from one connection."""
    import socket

    redis = Redis(appendonly=True)
    redis.start()
    try:
        server = psutil.Process(redis.pid)
        cmd = b"*5\r\n$4\r\nXADD\r\n$5\r\nbench\r\n$1\r\n*\r\n$1\r\nd\r\n$120\r\n%s\r\n" % (
            b"x" * 120
        )
        with socket.create_connection(("127.0.0.1", redis.port)) as s:
            c0 = cpu_s(server)
            t0 = time.perf_counter()
            for _ in range(n // 500):
                s.sendall(cmd * 500)
                buf = b""
                while buf.count(b"\r\n") < 1000:  # "$N\r\n<id>\r\n" per reply
                    buf += s.recv(1 << 20)
            wall = time.perf_counter() - t0
            cpu = cpu_s(server) - c0
        return {"rate": n / wall, "cpu_us": cpu / n * 1e6}
    finally:
        redis.cleanup()


# -- targets -------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    label: str
    start: Callable[[Mosquitto, Redis | None, str], Any]  # returns an object with .pid and .stop()
    needs_redis: bool


class _Popen:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        self.pid = self.proc.pid
        self.log_path = log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class _Bridge:
    def __init__(
        self,
        mosq: Mosquitto,
        redis: Redis | None,
        url: str,
        *,
        status: bool = False,
        argv: list[str] | None = None,
    ) -> None:
        self.bp = BridgeProc(
            mqtt_port=mosq.port,
            backend_url=url,
            redis_url=redis.url if redis else "",
            conf={
                "mqtt": {"client_id": "bench-bridge"},
                "backend": {"timeout": 10.0, "retry_max_delay": 1.0},
                "status": {"listen": f"127.0.0.1:{free_port()}" if status else ""},
                "whatsapp": {"provider": "log"},
                "log": {"level": "WARNING"},
            },
            argv=argv,
        )
        self.bp.start(wait_ready=False)
        self.pid = self.bp.pid
        self.log = ""

    def log_text(self) -> str:
        return self.bp.log_text()

    def stop(self) -> None:
        if self.bp.running():
            try:
                self.bp.terminate(20)
            except subprocess.TimeoutExpired:
                self.bp.kill()
        self.log = self.bp.log_text()
        shutil.rmtree(self.bp.dir, ignore_errors=True)


def bridge_target(*, status: bool = False, pyz: bool = False) -> Target:
    name = "bridge" + ("+status" if status else "") + (" (.pyz)" if pyz else "")
    argv = [sys.executable, str(PYZ)] if pyz else None
    if not pyz and os.environ.get("BENCH_BRIDGE_ARGV"):  # e.g. an instrumented wrapper
        argv = os.environ["BENCH_BRIDGE_ARGV"].split()
    return Target(
        name,
        "botonera-bridge",
        lambda m, r, u: _Bridge(m, r, u, status=status, argv=argv),
        needs_redis=True,
    )


def naive_target(workdir: Path) -> Target:
    def start(m: Mosquitto, r: Redis | None, url: str) -> _Popen:
        return _Popen(
            [sys.executable, str(ROOT / "bench" / "baselines" / "naive.py"),
             "--port", str(m.port), "--url", url, "--client-id", "bench-naive"],
            workdir / "naive.log",
        )  # fmt: skip

    return Target("naive", "naive keep-alive", start, needs_redis=False)


def nodered_target(workdir: Path) -> Target:
    def start(m: Mosquitto, r: Redis | None, url: str) -> _Popen:
        user_dir = workdir / "node-red-user"
        user_dir.mkdir(exist_ok=True)
        return _Popen(
            [shutil.which("node") or "node", str(NODE_RED_JS),
             "--settings", str(ROOT / "bench" / "nodered" / "settings.js"),
             "--userDir", str(user_dir), str(ROOT / "bench" / "nodered" / "flow.json")],
            workdir / "node-red.log",
            env={
                "MQTT_PORT": str(m.port),
                "MQTT_CLIENT_ID": "bench-nodered",
                "SINK_ENDPOINT": url.rstrip("/") + "/api/mqtt-alerts/process",
                "NODE_RED_PORT": str(free_port()),
            },
        )  # fmt: skip

    return Target("nodered", "Node-RED 4", start, needs_redis=False)


def ensure_node_red() -> str:
    """Install Node-RED 4 into bench/.node-red with npm once; '' when ready, else why not."""
    if NODE_RED_JS.exists():
        return ""
    if shutil.which("npm") is None or shutil.which("node") is None:
        return "npm/node not installed"
    print(f"installing node-red@{NODE_RED_VERSION} into {NODE_RED_DIR} (npm) ...", flush=True)
    NODE_RED_DIR.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["npm", "install", "--prefix", str(NODE_RED_DIR), "--no-audit", "--no-fund",
         f"node-red@{NODE_RED_VERSION}"],
        timeout=600, capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0 or not NODE_RED_JS.exists():
        return f"npm install failed: {r.stderr.strip()[-300:]}"
    return ""


def node_red_version() -> str:
    try:
        pkg = json.loads((NODE_RED_JS.parent / "package.json").read_text())
        return str(pkg["version"])
    except (OSError, KeyError, ValueError):
        return "?"


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.p = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(SAMPLE_EVERY)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(2)


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


@dataclass
class RunResult:
    throughput: float = 0.0
    cpu_us: float = 0.0
    cpu_steady_us: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    drain_s: float = 0.0  # backlog: target start -> last POST
    drain_p99_s: float = 0.0  # backlog: p99 of (POST time - target start)
    drain_rate: float = 0.0  # backlog: N / (last POST - first POST)
    idle_rss: float = 0.0
    peak_rss: float = 0.0
    burst_pub_rate: float = 0.0
    lost: int = 0
    duplicates: int = 0
    load: float = 0.0  # 1-minute load average when the run started
    extra: dict[str, Any] = field(default_factory=dict)


def _warm_up(target: Target, proc: Any, sink: Sink, pub: Publisher, first: int) -> None:
    """The target is subscribed once an alarm comes out the other side."""
    deadline = time.monotonic() + 60
    warm = range(first, first + WARMUP)
    while True:
        pub.burst(warm)
        try:
            sink.wait_all(warm, 2)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                tail = proc.log_text()[-2000:]
                raise TimeoutError(
                    f"{target.name} never forwarded the warm-up; its log ends:\n{tail}"
                ) from None
            warm = range(warm.stop, warm.stop + WARMUP)


def _spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    spy = subprocess.Popen(
        [py_spy() or "py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
         "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)  # let py-spy attach
    return spy


def _unspy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(10)


def run_once(
    target: Target,
    sink: Sink,
    run_no: int,
    *,
    profile: tuple[str, Path] | None = None,
    idle_only: bool = False,
    burst_only: bool = False,
    steady_only: bool = False,
    mosquitto_extra: str = "",
) -> RunResult:
    """One full measurement of one target on a fresh broker (and Redis). ``idle_only``: up
    to the idle RSS; ``steady_only``: only the 500 msg/s phase; ``profile=(phase, path)``:
    py-spy over the "burst" or "steady" phase only, then stop."""
    mosq = Mosquitto(extra=mosquitto_extra)
    mosq.start()
    redis = Redis(appendonly=True) if target.needs_redis else None
    if redis:
        redis.start()
    res = RunResult(load=os.getloadavg()[0])
    proc = target.start(mosq, redis, sink.url)
    spy: subprocess.Popen[bytes] | None = None
    rss: RssSampler | None = None
    log_lines = 0
    try:
        p = psutil.Process(proc.pid)
        pub = Publisher(mosq.port, f"bench-pub-{target.name}-{run_no}")
        base = 1_000_000 * (run_no + 1)  # seq ranges never repeat within a run
        _warm_up(target, proc, sink, pub, base + 900_000)
        time.sleep(2)  # settle, then idle RSS
        res.idle_rss = p.memory_info().rss / 2**20
        sink.dump()
        if idle_only:
            pub.close()
            return res
        rss = RssSampler(proc.pid).__enter__()
        phase = profile[0] if profile else ""
        # burst
        if not steady_only:
            if phase == "burst":
                assert profile is not None
                spy = _spy(proc.pid, profile[1])
            seqs = range(base, base + BURST)
            c0 = cpu_s(p)
            s0 = sink.stats()["cpu_s"]
            t0 = time.time_ns()
            pub.burst(seqs)
            res.burst_pub_rate = BURST / ((time.time_ns() - t0) / 1e9)
            a = sink.wait_seqs(seqs, DRAIN_TIMEOUT)
            c1 = cpu_s(p)
            a.duplicates += sink.late_copies(seqs, 1.0)
            res.lost += a.lost
            res.duplicates += a.duplicates
            res.extra["sink_us"] = (sink.stats()["cpu_s"] - s0) / BURST * 1e6
            last = max(r for _, r in a.got.values())
            res.throughput = len(a.got) / ((last - t0) / 1e9)
            res.cpu_us = (c1 - c0) / BURST * 1e6
            if spy is not None:
                _unspy(spy)
                spy = None
                return res
            if burst_only:
                pub.close()
                return res
        # steady
        if phase == "steady":
            assert profile is not None
            spy = _spy(proc.pid, profile[1])
        seqs = range(base + 100_000, base + 100_000 + RATE * RATE_SECONDS)
        c0 = cpu_s(p)
        pub.paced(seqs, RATE)
        a = sink.wait_seqs(seqs, DRAIN_TIMEOUT)
        res.cpu_steady_us = (cpu_s(p) - c0) / len(seqs) * 1e6
        a.duplicates += sink.late_copies(seqs, 0.5)
        res.lost += a.lost
        res.duplicates += a.duplicates
        lat = sorted((r - s) / 1e6 for s, r in a.got.values())
        res.p50, res.p95, res.p99, res.max = (pct(lat, q) for q in (0.50, 0.95, 0.99, 1.0))
        if spy is not None or steady_only:
            if spy is not None:
                _unspy(spy)
                spy = None
            pub.close()
            return res
        # backlog: the broker holds BACKLOG alarms for the stopped target's session
        if not pub.wait_acked(30):
            raise TimeoutError("publisher: PUBACKs missing before the backlog")
        rss.__exit__()
        peak = rss.peak
        proc.stop()
        log_lines += _log_lines(proc)
        seqs = range(base + 200_000, base + 200_000 + BACKLOG)
        pub.burst(seqs)
        if not pub.wait_acked(60):
            raise TimeoutError("publisher: the broker did not take the backlog")
        sink.dump()
        t_start = time.time_ns()
        proc = target.start(mosq, redis, sink.url)
        rss = RssSampler(proc.pid).__enter__()
        a = sink.wait_seqs(seqs, DRAIN_TIMEOUT, settle=1.0)
        res.lost += a.lost
        res.duplicates += a.duplicates
        arrivals = sorted((r - t_start) / 1e9 for _, r in a.got.values())
        res.drain_s = arrivals[-1]
        res.drain_p99_s = pct(arrivals, 0.99)
        res.drain_rate = len(arrivals) / max(1e-9, arrivals[-1] - arrivals[0])
        rss.__exit__()
        res.peak_rss = max(peak, rss.peak) / 2**20
        rss = None
        pub.close()
        return res
    finally:
        if rss is not None:
            rss.__exit__()
        if spy is not None:
            _unspy(spy)
        proc.stop()
        log_lines += _log_lines(proc)
        res.extra["log_lines"] = log_lines
        mosq.cleanup()
        if redis:
            redis.cleanup()


def _log_lines(proc: Any) -> int:
    log = getattr(proc, "log", "")
    return len(log.splitlines()) if isinstance(log, str) else 0


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def ensure_py_spy() -> str:
    """'' once py-spy is there (pip-installed into this interpreter if missing), else why not."""
    if py_spy():
        return ""
    print("installing py-spy (pip) for the profiles ...", flush=True)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "py-spy"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return "" if py_spy() else f"pip install py-spy failed: {r.stderr.strip()[-300:]}"


# -- start-up ------------------------------------------------------------------------------------


def warm_start(argv: list[str], runs: int = 5) -> float:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([*argv, "--help"], capture_output=True, env=env, check=True, timeout=120)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([*argv, "--help"], capture_output=True, env=env, check=True, timeout=60)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ensure_pyz() -> bool:
    """``make pyz`` (rebuilt only when a source changed), with this interpreter."""
    r = subprocess.run(
        ["make", "pyz", f"PYTHON={sys.executable}"], cwd=ROOT, timeout=600, capture_output=True
    )
    return r.returncode == 0 and PYZ.exists()


# -- profile -------------------------------------------------------------------------------------


def summarize_profile(path: Path, top: int = 15) -> str:
    """py-spy raw (collapsed) stacks -> top functions by own time and by inclusive time."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "(empty profile)"
    lines = [f"{total} samples", "", "| own % | function |", "|---:|---|"]
    lines += [f"| {c / total:.1%} | `{f}` |" for f, c in own.most_common(top)]
    lines += ["", "| inclusive % | function |", "|---:|---|"]
    lines += [
        f"| {c / total:.1%} | `{f}` |"
        for f, c in incl.most_common(top * 3)
        if "botonera_bridge" in f or "h11" in f or "paho" in f
    ][:top]
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "func (/path/site-packages/pkg/mod.py:123)" -> "func (pkg/mod.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "/lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})"


# -- report --------------------------------------------------------------------------------------


ROWS = (  # key, label, unit
    ("throughput", "burst throughput (20,000 alarms)", "msg/s"),
    ("cpu_us", "CPU per message, burst", "µs"),
    ("cpu_steady_us", "CPU per message @ 500 msg/s", "µs"),
    ("p50", "latency p50 @ 500 msg/s", "ms"),
    ("p95", "latency p95 @ 500 msg/s", "ms"),
    ("p99", "latency p99 @ 500 msg/s", "ms"),
    ("max", "latency max @ 500 msg/s", "ms"),
    ("drain_s", "backlog of 10,000: start → last POST", "s"),
    ("drain_p99_s", "backlog of 10,000: p99 arrival after start", "s"),
    ("drain_rate", "backlog of 10,000: drain rate", "msg/s"),
    ("idle_rss", "idle RSS", "MB"),
    ("peak_rss", "peak RSS (all phases)", "MB"),
)
GOALS: dict[str, tuple[str, Callable[[float, float], bool]]] = {  # vs Node-RED: (text, ok?)
    "throughput": ("≥ 2.0× Node-RED", lambda v, ratio: ratio >= 2.0),
    "cpu_us": ("≤ 0.4× Node-RED", lambda v, ratio: ratio <= 0.4),
    "cpu_steady_us": ("≤ 0.4× Node-RED", lambda v, ratio: ratio <= 0.4),
    "p99": ("≤ 0.5× Node-RED", lambda v, ratio: ratio <= 0.5),
    "idle_rss": ("≤ 40 MB", lambda v, ratio: v <= 40),
    "peak_rss": ("≤ 120 MB", lambda v, ratio: v <= 120),
}


def median_of(results: list[RunResult], key: str) -> float:
    return statistics.median(getattr(r, key) for r in results)


def ratio_of(a: list[RunResult], b: list[RunResult], key: str) -> float:
    """Median of per-repetition ratios (run i of a against run i of b)."""
    rs = [getattr(x, key) / getattr(y, key) for x, y in zip(a, b, strict=False) if getattr(y, key)]
    return statistics.median(rs) if rs else float("nan")


def fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def table(res: dict[str, list[RunResult]], main: str, others: list[str]) -> str:
    head = (
        f"| metric | {main} | " + " | ".join(others) + " | "
        + " | ".join(f"{main}/{o}" for o in others) + " | target | |"
    )
    out = [head, "|---" * (len(others) * 2 + 4) + "|"]
    for key, label, unit in ROWS:
        v = median_of(res[main], key)
        cells = [fmt(median_of(res[o], key)) for o in others]
        ratios = [ratio_of(res[main], res[o], key) for o in others]
        goal = GOALS.get(key)
        mark = ""
        if goal and "nodered" in others:
            mark = "✓" if goal[1](v, ratios[others.index("nodered")]) else "✗"
        elif goal and key in ("idle_rss", "peak_rss"):
            mark = "✓" if goal[1](v, 0.0) else "✗"
        out.append(
            f"| {label} ({unit}) | {fmt(v)} | " + " | ".join(cells) + " | "
            + " | ".join(f"{r:.2f}×" for r in ratios)
            + f" | {goal[0] if goal else ''} | {mark} |"
        )
    return "\n".join(out)


def per_run(all_results: dict[str, list[RunResult]]) -> str:
    out = [
        "| target | run | load | msg/s | µs/msg burst | µs/msg 500/s | p50 | p99 | max "
        "| drain s | drain p99 s | idle MB | peak MB | lost | dup | log lines |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in all_results.items():
        for i, r in enumerate(results, 1):
            out.append(
                f"| {name} | {i} | {r.load:.2f} | {r.throughput:,.0f} | {r.cpu_us:.0f} | "
                f"{r.cpu_steady_us:.0f} | {r.p50:.2f} | {r.p99:.2f} | {r.max:.1f} | "
                f"{r.drain_s:.2f} | {r.drain_p99_s:.2f} | {r.idle_rss:.1f} | {r.peak_rss:.1f} | "
                f"{r.lost} | {r.duplicates} | {r.extra.get('log_lines', 0)} |"
            )
    return "\n".join(out)


def http_clients(sink: Sink, n: int) -> list[dict[str, Any]]:
    rows = []
    for kind in ("httpx", "httpcore", "http11"):
        samples = []
        for _ in range(3):
            out = subprocess.run(
                [sys.executable, str(ROOT / "bench" / "http_clients.py"), "--url", sink.url,
                 "--kind", kind, "--n", str(n)],
                capture_output=True, text=True, check=True, timeout=300,
            )  # fmt: skip
            samples.append(json.loads(out.stdout))
        sink.dump()
        rows.append({
            "kind": kind,
            "cpu_us_per_post": statistics.median(s["cpu_us_per_post"] for s in samples),
            "posts_per_s": statistics.median(s["posts_per_s"] for s in samples),
        })  # fmt: skip
    return rows


def only(mode: str, wanted: list[str], runs: int, baseline: str | None = None) -> int:
    """A quick before/after for one change: one mode, medians printed, nothing written.
    ``baseline``: an older tree's ``src`` folder, run as a second bridge target; the
    targets' runs are interleaved (A B A B ...) so a change in the machine's load hits both."""
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bb-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    if "nodered" in wanted and ensure_node_red():
        wanted.remove("nodered")
    if mode == "idle":
        ensure_pyz()
        targets = [bridge_target(status=True)] + ([bridge_target(status=True, pyz=True)]
                                                  if PYZ.exists() else [])
    else:
        known = {"bridge": bridge_target(), "nodered": nodered_target(workdir),
                 "naive": naive_target(workdir)}
        targets = [known[n] for n in wanted]
    if baseline is not None:
        argv = ["env", f"PYTHONPATH={Path(baseline).resolve()}", sys.executable,
                "-m", "botonera_bridge"]
        targets.insert(0, Target(f"bridge (baseline {baseline})", "botonera-bridge",
                                 lambda m, r, u: _Bridge(m, r, u, status=mode == "idle",
                                                         argv=argv),
                                 needs_redis=True))
    sink = Sink()
    results: dict[str, list[RunResult]] = {t.name: [] for t in targets}
    try:
        for i in range(runs):
            for t in targets:
                r = run_once(t, sink, i, idle_only=mode == "idle", steady_only=mode == "steady")
                results[t.name].append(r)
                print(f"  {t.name} run {i + 1}: load {r.load:.2f}, idle {r.idle_rss:.1f} MB"
                      + (f", {r.cpu_steady_us:.0f} µs/msg, p50 {r.p50:.2f} p99 {r.p99:.2f} "
                         f"max {r.max:.1f} ms, lost {r.lost} dup {r.duplicates}"
                         if mode == "steady" else ""), flush=True)
        for t in targets:
            rs = results[t.name]
            if mode == "steady":
                print(f"{t.name}: median {median_of(rs, 'cpu_steady_us'):.0f} µs/msg, p50 "
                      f"{median_of(rs, 'p50'):.2f} p99 {median_of(rs, 'p99'):.2f} ms, lost "
                      f"{sum(r.lost for r in rs)} dup {sum(r.duplicates for r in rs)}",
                      flush=True)
            else:
                print(f"{t.name}: median idle RSS {median_of(rs, 'idle_rss'):.1f} MB", flush=True)
    finally:
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def steady_alone(
    results: dict[str, list[RunResult]],
    nodered: Target | None,
    sink: Sink,
    runs: int,
    say: Callable[[str], None],
) -> None:
    """The 500 msg/s phase on its own (no burst before it), Node-RED and the bridge
    interleaved. In the main table the steady phase follows the 20,000 burst, which
    Node-RED may still be digesting (its p99 then swings from milliseconds to seconds)."""
    alone: dict[str, list[RunResult]] = {"bridge": []}
    if nodered:
        alone["nodered"] = []
    for i in range(runs):
        if nodered:
            alone["nodered"].append(run_once(nodered, sink, 50 + i, steady_only=True))
        alone["bridge"].append(run_once(bridge_target(), sink, 60 + i, steady_only=True))
    say(f"500 msg/s on its own (no burst before it; runs interleaved, medians of {runs}):")
    say()
    say("| target | CPU µs/msg | p50 ms | p99 ms | max ms | lost | dup |")
    say("|---|---:|---:|---:|---:|---:|---:|")
    for name, rs in alone.items():
        say(f"| {name} | {median_of(rs, 'cpu_steady_us'):.0f} | {median_of(rs, 'p50'):.2f} | "
            f"{median_of(rs, 'p99'):.2f} | {median_of(rs, 'max'):.1f} | "
            f"{sum(r.lost for r in rs)} | {sum(r.duplicates for r in rs)} |")
    say()
    if nodered:
        cpu = ratio_of(alone["bridge"], alone["nodered"], "cpu_steady_us")
        p99 = ratio_of(alone["bridge"], alone["nodered"], "p99")
        say(f"Bridge/Node-RED, steady on its own: CPU {cpu:.2f}× (target ≤ 0.4×), p99 "
            f"{p99:.2f}× (target ≤ 0.5×).")
        say()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--targets", default="bridge,nodered,naive", help="comma-separated")
    ap.add_argument("--http-clients", action="store_true", help="add the HTTP-client micro-bench")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    ap.add_argument("--no-extras", action="store_true", help="skip status-on idle RSS and .pyz")
    ap.add_argument("--out", default=str(RESULTS / "latest.md"))
    ap.add_argument("--only", choices=["steady", "idle"],
                    help="one mode only, printed, no results file: steady = 500 msg/s per "
                    "target; idle = idle RSS of the bridge with the status server on")
    ap.add_argument("--baseline", metavar="SRC",
                    help="with --only: also run the bridge from this older tree's src folder "
                    "(e.g. from `git archive`), runs interleaved with this tree's")
    args = ap.parse_args()
    if args.only:
        return only(args.only, [t.strip() for t in args.targets.split(",")], args.runs,
                    args.baseline)
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bb-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    skipped: list[str] = []
    if "nodered" in wanted:
        why = ensure_node_red()
        if why:
            skipped.append(f"Node-RED skipped: {why}")
            wanted.remove("nodered")
    all_targets = {
        "bridge": bridge_target(),
        "nodered": nodered_target(workdir),
        "naive": naive_target(workdir),
    }
    targets = [all_targets[n] for n in wanted]
    sink = Sink()
    try:
        cap = sink_capacity(sink)
        mosq = Mosquitto()
        mosq.start()
        try:
            pub = publisher_rate(mosq)
        finally:
            mosq.cleanup()
        rcap = redis_capacity()
        say("# botonera-bridge benchmark")
        say()
        say(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} · {platform.node()} · Python "
            f"{platform.python_version()} · {os.cpu_count()} CPUs · {platform.platform()} · "
            f"load average at start {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} / "
            f"{os.getloadavg()[2]:.2f}")
        say()
        for line in skipped:
            say(f"**{line}** (install node/npm, or run `npm install --prefix bench/.node-red "
                f"node-red@{NODE_RED_VERSION}`)")
            say()
        say("Setup: private mosquitto (fresh per run, defaults: 20 in-flight QoS 1 messages per "
            "client) and redis-server (fresh per run, AOF everysec) on loopback; every target "
            "subscribes at QoS 1 with a persistent session (clean_session=false, fixed client "
            "id) and POSTs each alarm to the same sink. Targets:")
        say("- **bridge**: the installed package (`python -m botonera_bridge run`) on its "
            "durable path (Redis outbox on; PUBACK once the alarm is in Redis), "
            "`log.level = \"WARNING\"`, `whatsapp.provider = \"log\"` and no contactos (no "
            "alarm needs WhatsApp), status server off, built-in empresas (alarms spread over "
            "cota/tocancipa/funza/madrid: 4 lanes);")
        say(f"- **nodered**: Node-RED {node_red_version()} (`bench/nodered/flow.json`: mqtt in "
            "→ http request with keep-alive; no outbox: mqtt.js acknowledges on receipt, so "
            "what Node-RED holds in memory is lost if it dies);")
        say("- **naive**: `bench/baselines/naive.py` (paho `loop_forever`, `requests.Session` "
            "keep-alive, PUBACK after the POST, one at a time).")
        say()
        say("Capacity of the tools themselves (none of them is the limit):")
        say(f"- sink: {cap['capacity']:,.0f} req/s on one core ({cap['cpu_us']:.1f} µs "
            f"CPU/request, pipelined); {cap['rate']:,.0f} req/s reached by a Python load client")
        say(f"- publisher + mosquitto (QoS 1, nobody subscribed): {pub['rate']:,.0f} msg/s; "
            f"mosquitto {pub['broker_us']:.1f} µs CPU per message")
        say(f"- redis-server: {rcap['cpu_us']:.1f} µs CPU per XADD (AOF everysec, pipelined), "
            f"{rcap['rate']:,.0f} XADD/s from one Python client")
        say()
        results: dict[str, list[RunResult]] = {t.name: [] for t in targets}
        for run_no in range(args.runs):
            for t in targets:
                try:
                    r = run_once(t, sink, run_no)
                except TimeoutError as exc:  # once: a busy shared machine can starve a start
                    print(f"  run {run_no + 1} {t.name} failed, retrying once: {exc}", flush=True)
                    r = run_once(t, sink, run_no + 10)
                results[t.name].append(r)
                print(f"  run {run_no + 1} {t.name}: {r.throughput:,.0f} msg/s, "
                      f"{r.cpu_us:.0f}/{r.cpu_steady_us:.0f} µs/msg, p99 {r.p99:.2f} ms, "
                      f"drain {r.drain_s:.1f} s, rss {r.idle_rss:.1f}/{r.peak_rss:.1f} MB, "
                      f"lost {r.lost} dup {r.duplicates} "
                      f"[{time.monotonic() - started:.0f}s]", flush=True)
        sink_us = statistics.median(r.extra["sink_us"] for rs in results.values() for r in rs)
        say(f"- sink CPU per POST during the bursts (no pipelining): {sink_us:.0f} µs median, "
            f"i.e. about {1e6 / sink_us:,.0f} POST/s on one core")
        say()
        if "bridge" in results and len(results) > 1:
            others = [n for n in results if n != "bridge"]
            say(f"## Results (medians of {args.runs} runs; ratios = median of the per-run "
                "ratios)")
            say()
            say(table(results, "bridge", others))
            say()
        if not args.no_extras and "bridge" in results:
            idle_on = statistics.median(
                run_once(bridge_target(status=True), sink, 20 + i, idle_only=True).idle_rss
                for i in range(args.runs)
            )
            have_pyz = ensure_pyz()
            if have_pyz:
                idle_pyz = statistics.median(
                    run_once(bridge_target(status=True, pyz=True), sink, 30 + i,
                             idle_only=True).idle_rss
                    for i in range(args.runs)
                )  # fmt: skip
                start_pyz = warm_start([sys.executable, str(PYZ)])
            idle_off = median_of(results["bridge"], "idle_rss")
            say(f"Idle RSS with the status server on (`status.listen` set, hypercorn loaded), "
                f"medians of {args.runs}: package {idle_on:.1f} MB "
                f"({'✓' if idle_on <= 40 else '✗'} ≤ 40 MB; status off: {idle_off:.1f} MB)"
                + (f"; `.pyz` {idle_pyz:.1f} MB ({'✓' if idle_pyz <= 40 else '✗'})."
                   if have_pyz else "; `.pyz`: `make pyz` failed, not measured."))
            if have_pyz:
                say(f"`.pyz` warm start of `--help`: {start_pyz:.2f} s.")
            say()
            wide = [
                run_once(bridge_target(), sink, 40 + i, burst_only=True,
                         mosquitto_extra="max_inflight_messages 1000")
                for i in range(args.runs)
            ]  # fmt: skip
            say(f"Burst with mosquitto `max_inflight_messages 1000` (default 20), bridge, "
                f"medians of {args.runs}: {median_of(wide, 'throughput'):,.0f} msg/s, "
                f"{median_of(wide, 'cpu_us'):.0f} µs CPU/msg, lost "
                f"{sum(r.lost for r in wide)}, dup {sum(r.duplicates for r in wide)} "
                f"(default window: {median_of(results['bridge'], 'throughput'):,.0f} msg/s).")
            say()
            steady_alone(results, all_targets["nodered"] if "nodered" in results else None,
                         sink, args.runs, say)
        say("Throughput = 20,000 / (last POST at the sink − first alarm published). CPU = the "
            "target process's user+sys time (psutil) from the first publish to the last POST, "
            "/ N (at 500 msg/s this includes the idle cost of 20 s). Latency = sink receive "
            "time − `sent_ns` in the payload (same clock). Backlog: the target is stopped "
            "(SIGTERM), 10,000 alarms go to the broker for its session, then the target "
            "starts; times are from its start (process start-up included). lost = alarms that "
            "never reached the sink; dup = extra copies. `load` = the 1-minute load average "
            "when the run started (2 cores shared with other work: absolutes move, ratios "
            "within one invocation carry over).")
        say()
        say("### Every run")
        say()
        say(per_run(results))
        say()
        if args.http_clients:
            say("## HTTP clients: CPU per POST (bench/http_clients.py; 4 lanes, keep-alive, to "
                "the bench sink; medians of 3)")
            say()
            say("| client | CPU µs/POST | POST/s |")
            say("|---|---:|---:|")
            for row in http_clients(sink, 6000):
                say(f"| {row['kind']} | {row['cpu_us_per_post']:.0f} | "
                    f"{row['posts_per_s']:,.0f} |")
            say()
        why = "" if args.no_profile or "bridge" not in results else ensure_py_spy()
        if why:
            say(f"(profiles skipped: {why})")
        elif not args.no_profile and "bridge" in results:
            for phase in ("burst", "steady"):
                prof = RESULTS / f"profile-bridge-{phase}.txt"
                r = run_once(bridge_target(), sink, 90 + len(phase), profile=(phase, prof))
                got = (f"{r.throughput:,.0f} msg/s" if phase == "burst"
                       else f"{r.cpu_steady_us:.0f} µs/msg, p99 {r.p99:.2f} ms")
                say(f"## Profile of the bridge, {phase} (py-spy, 200 Hz; {got} under the "
                    "profiler)")
                say()
                say(summarize_profile(prof) if prof.exists() else "(py-spy wrote nothing)")
                say()
        say(f"_bench took {time.monotonic() - started:.0f} s; load average at the end "
            f"{os.getloadavg()[0]:.2f}_")
    finally:
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    out.write_text("\n".join(report) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
