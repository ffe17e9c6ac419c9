"""`make bench`: the bridge against the naive forwarder, same machine, same invocation.

Per target and run: a fresh private mosquitto (defaults: 20 in-flight QoS 1
messages per client) and, for the bridge, a fresh private redis-server (AOF,
everysec). Every target POSTs to the same fast sink (bench/sink.py).

Measured (medians over --runs, default 3):
- burst: 20,000 alarms published at full speed while the target is subscribed;
  throughput = N / (last POST received at the sink - first alarm published);
- latency at a fixed 500 msg/s for 20 s: sink receive time - publish time (p50/p95/p99/max);
- CPU µs per message: the target process's user+sys time over the burst / N;
- RSS: idle (2 s after warm-up) and peak (sampled every 20 ms through burst and latency);
- the .pyz warm start of ``--help``.
Then: idle RSS with the status server on, a py-spy profile of one bridge burst,
and bench/http_clients.py, the HTTP-client micro-benchmark (CPU per POST of httpx /
httpcore / the product's sinks/http11.Http11Pool) that explains the backend client choice.

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
BURST = 20_000
RATE = 500  # msg/s
RATE_SECONDS = 20
WARMUP = 50
DRAIN_TIMEOUT = 180.0  # seconds to wait for the sink to see everything
SAMPLE_EVERY = 0.02  # seconds between RSS samples


# -- the sink ------------------------------------------------------------------------------------


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

    def wait_seqs(self, seqs: range, timeout: float) -> dict[int, tuple[int, int]]:
        """Collect records until every seq in ``seqs`` arrived; {seq: (sent_ns, first recv_ns)}."""
        want = set(seqs)
        got: dict[int, tuple[int, int]] = {}
        deadline = time.monotonic() + timeout
        while True:
            for seq, sent, recv in self.dump():
                if seq in want and seq not in got:
                    got[seq] = (sent, recv)
            if len(got) == len(want):
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"sink saw {len(got)}/{len(want)} messages after {timeout}s")
            time.sleep(0.1)

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


def publisher_rate(mosq: Mosquitto) -> float:
    """Publish a burst to mosquitto with nobody subscribed: msg/s until the last PUBACK."""
    pub = Publisher(mosq.port, f"pubrate-{os.getpid()}", topic="nobody/listens")
    t0 = time.perf_counter()
    pub.burst(range(BURST))
    if not pub.wait_acked(60):
        raise TimeoutError("publisher: PUBACKs missing")
    rate = BURST / (time.perf_counter() - t0)
    pub.close()
    return rate


# -- targets -------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    start: Callable[[Mosquitto, Redis | None, str], Any]  # returns an object with .pid and .stop()
    needs_redis: bool


class _Popen:
    def __init__(self, argv: list[str], log: Path) -> None:
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class _Bridge:
    def __init__(self, mosq: Mosquitto, redis: Redis | None, url: str, *, status: bool = False):
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
        )
        self.bp.start(wait_ready=False)
        self.pid = self.bp.pid

    def stop(self) -> None:
        if self.bp.running():
            try:
                self.bp.terminate(20)
            except subprocess.TimeoutExpired:
                self.bp.kill()
        self.log = self.bp.log_text()
        shutil.rmtree(self.bp.dir, ignore_errors=True)


def bridge_target(*, status: bool = False) -> Target:
    name = "bridge+status" if status else "bridge"
    return Target(name, lambda m, r, u: _Bridge(m, r, u, status=status), needs_redis=True)


def naive_target(workdir: Path) -> Target:
    def start(m: Mosquitto, r: Redis | None, url: str) -> _Popen:
        return _Popen(
            [sys.executable, str(ROOT / "bench" / "baselines" / "naive.py"),
             "--port", str(m.port), "--url", url, "--client-id", "bench-naive"],
            workdir / "naive.log",
        )  # fmt: skip

    return Target("naive", start, needs_redis=False)


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
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    idle_rss: float = 0.0
    peak_rss: float = 0.0
    burst_pub_rate: float = 0.0
    load: float = 0.0  # 1-minute load average when the run started
    extra: dict[str, Any] = field(default_factory=dict)


def run_once(
    target: Target,
    sink: Sink,
    run_no: int,
    *,
    profile: Path | None = None,
    idle_only: bool = False,
) -> RunResult:
    """One full measurement of one target on fresh broker and Redis (``idle_only``: up to
    the idle RSS)."""
    mosq = Mosquitto()
    mosq.start()
    redis = Redis(appendonly=True) if target.needs_redis else None
    if redis:
        redis.start()
    res = RunResult(load=os.getloadavg()[0])
    proc = target.start(mosq, redis, sink.url)
    spy: subprocess.Popen[bytes] | None = None
    try:
        p = psutil.Process(proc.pid)
        pub = Publisher(mosq.port, f"bench-pub-{target.name}-{run_no}")
        base = 1_000_000 * (run_no + 1)  # seq ranges never repeat within a run
        # warm up: the target is subscribed once the first alarm comes out the other side
        deadline = time.monotonic() + 30
        warm = range(base + 900_000, base + 900_000 + WARMUP)
        while True:
            pub.burst(warm)
            try:
                sink.wait_seqs(warm, 2)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    tail = proc.bp.log_text()[-2000:] if isinstance(proc, _Bridge) else ""
                    raise TimeoutError(
                        f"{target.name} never forwarded the warm-up; its log ends:\n{tail}"
                    ) from None
                warm = range(warm.stop, warm.stop + WARMUP)
        time.sleep(2)  # settle, then idle RSS
        res.idle_rss = p.memory_info().rss / 2**20
        sink.dump()
        if idle_only:
            pub.close()
            return res
        with RssSampler(proc.pid) as rss:
            if profile is not None:
                spy = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(proc.pid), "--format", "raw", "--rate", "200",
                     "--nonblocking", "--output", str(profile)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(1.0)  # let py-spy attach
            seqs = range(base, base + BURST)
            c0 = cpu_s(p)
            s0 = sink.stats()["cpu_s"]
            t0 = time.time_ns()
            pub.burst(seqs)
            res.burst_pub_rate = BURST / ((time.time_ns() - t0) / 1e9)
            got = sink.wait_seqs(seqs, DRAIN_TIMEOUT)
            c1 = cpu_s(p)
            res.extra["sink_us"] = (sink.stats()["cpu_s"] - s0) / BURST * 1e6
            last = max(r for _, r in got.values())
            res.throughput = BURST / ((last - t0) / 1e9)
            res.cpu_us = (c1 - c0) / BURST * 1e6
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
                spy = None
                return res
            time.sleep(1)
            sink.dump()
            seqs = range(base + 100_000, base + 100_000 + RATE * RATE_SECONDS)
            pub.paced(seqs, RATE)
            got = sink.wait_seqs(seqs, DRAIN_TIMEOUT)
            lat = sorted((r - s) / 1e6 for s, r in got.values())
            res.p50, res.p95, res.p99, res.max = (pct(lat, q) for q in (0.50, 0.95, 0.99, 1.0))
        res.peak_rss = rss.peak / 2**20
        pub.close()
        return res
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        proc.stop()
        log = getattr(proc, "log", "")
        res.extra["log_lines"] = len(log.splitlines()) if isinstance(log, str) else 0
        mosq.cleanup()
        if redis:
            redis.cleanup()


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
    if PYZ.exists():
        return True
    r = subprocess.run(["make", "pyz"], cwd=ROOT, timeout=600)
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
        if "botonera_bridge" in f or "h11" in f or "httpx" in f or "httpcore" in f
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


ROWS = (  # key, label, unit, better
    ("throughput", "burst throughput (20,000 alarms)", "msg/s", "higher"),
    ("cpu_us", "CPU per message (burst)", "µs", "lower"),
    ("p50", "latency p50 @ 500 msg/s", "ms", "lower"),
    ("p95", "latency p95 @ 500 msg/s", "ms", "lower"),
    ("p99", "latency p99 @ 500 msg/s", "ms", "lower"),
    ("max", "latency max @ 500 msg/s", "ms", "lower"),
    ("idle_rss", "idle RSS", "MB", "lower"),
    ("peak_rss", "peak RSS (burst + latency)", "MB", "lower"),
)
TARGETS = {  # key: (target, value, ok?)
    "throughput": ("≥ 2.0× baseline", lambda v, b: v >= 2.0 * b),
    "cpu_us": ("≤ 0.5× baseline", lambda v, b: v <= 0.5 * b),
    "p99": ("≤ 5 ms", lambda v, b: v <= 5.0),
    "idle_rss": ("≤ 40 MB", lambda v, b: v <= 40),
    "peak_rss": ("≤ 120 MB", lambda v, b: v <= 120),
}


def median_of(results: list[RunResult], key: str) -> float:
    return statistics.median(getattr(r, key) for r in results)


def fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def table(all_results: dict[str, list[RunResult]], names: list[str]) -> str:
    base = all_results["naive"]
    head = "| metric | " + " | ".join(names) + " | naive (baseline) | " + " | ".join(
        f"{n}/naive" for n in names
    ) + " | target |"
    out = [head, "|---" * (len(names) * 2 + 3) + "|"]
    for key, label, unit, _ in ROWS:
        b = median_of(base, key)
        vals = [median_of(all_results[n], key) for n in names]
        goal = TARGETS.get(key)
        marks = []
        for v in vals:
            marks.append(("✓" if goal[1](v, b) else "✗") if goal else "")
        cells = [f"{fmt(v)} {m}".strip() for v, m in zip(vals, marks, strict=True)]
        ratios = [f"{v / b:.2f}×" if b else "—" for v in vals]
        out.append(
            f"| {label} ({unit}) | " + " | ".join(cells) + f" | {fmt(b)} | "
            + " | ".join(ratios) + f" | {goal[0] if goal else ''} |"
        )
    return "\n".join(out)


def per_run(all_results: dict[str, list[RunResult]]) -> str:
    out = [
        "| target | run | load | msg/s | µs/msg | p50 | p99 | max | idle MB | peak MB "
        "| pub msg/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in all_results.items():
        for i, r in enumerate(results, 1):
            out.append(
                f"| {name} | {i} | {r.load:.2f} | {r.throughput:,.0f} | {r.cpu_us:.0f} | "
                f"{r.p50:.2f} | "
                f"{r.p99:.2f} | {r.max:.1f} | {r.idle_rss:.1f} | {r.peak_rss:.1f} | "
                f"{r.burst_pub_rate:,.0f} |"
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--no-http-clients", action="store_true", help="skip the HTTP-client micro-benchmark"
    )
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bb-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    sink = Sink()
    try:
        cap = sink_capacity(sink)
        mosq = Mosquitto()
        mosq.start()
        try:
            pub_rate = publisher_rate(mosq)
        finally:
            mosq.cleanup()
        say("# botonera-bridge benchmark")
        say()
        say(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} · {platform.node()} · Python "
            f"{platform.python_version()} · {os.cpu_count()} CPUs · {platform.platform()}")
        say()
        say("Setup: private mosquitto (fresh per run, defaults: 20 in-flight QoS 1 messages per "
            "client) and redis-server (fresh per run, AOF everysec) on loopback. The bridge runs "
            "from the installed package (`python -m botonera_bridge run`) at QoS 1 with the Redis "
            "outbox on, `log.level = \"WARNING\"`, `whatsapp.provider = \"log\"` and no contactos "
            "(the WhatsApp sink reads and acknowledges each event, sends nothing), status server "
            "off, built-in empresas (alarms spread over cota/tocancipa/funza/madrid: 4 lanes). "
            "The baseline is `bench/baselines/naive.py` (paho loop_forever, persistent session, "
            "QoS 1, `requests.post` per message, no outbox).")
        say()
        say(f"- sink capacity: {cap['capacity']:,.0f} req/s on one core "
            f"({cap['cpu_us']:.1f} µs CPU/request, pipelined); "
            f"{cap['rate']:,.0f} req/s reached by a Python load client")
        say(f"- publisher alone (QoS 1, nobody subscribed): {pub_rate:,.0f} msg/s")
        say()
        targets = [bridge_target(), naive_target(workdir)]
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
                      f"{r.cpu_us:.0f} µs/msg, p99 {r.p99:.2f} ms, "
                      f"rss {r.idle_rss:.1f}/{r.peak_rss:.1f} MB "
                      f"[{time.monotonic() - started:.0f}s]", flush=True)
        names = [t.name for t in targets if t.name != "naive"]
        sink_us = statistics.median(r.extra["sink_us"] for rs in results.values() for r in rs)
        say(f"- sink CPU per POST during the bursts (no pipelining): {sink_us:.0f} µs median, "
            f"i.e. about {1e6 / sink_us:,.0f} POST/s on one core")
        for name in names:
            lines = [r.extra.get("log_lines", 0) for r in results[name]]
            say(f"- {name}: WARNING+ log lines per run: {lines}")
        say()
        say(f"## Results (medians of {args.runs} runs)")
        say()
        say(table(results, names))
        status_on = bridge_target(status=True)
        idle_on = statistics.median(
            run_once(status_on, sink, 20 + i, idle_only=True).idle_rss for i in range(args.runs)
        )
        pyz = warm_start([sys.executable, str(PYZ)]) if ensure_pyz() else float("nan")
        naive_start = warm_start([sys.executable, str(ROOT / "bench" / "baselines" / "naive.py")])
        ok = "✓" if pyz <= 0.5 else "✗"
        say(f"| `.pyz` warm start `--help` (s) | {fmt(pyz)} {ok} | "
            + " | ".join("" for _ in names[1:]) + (" | " if len(names) > 1 else "")
            + f"{naive_start:.2f} (`naive.py --help`) | {pyz / naive_start:.2f}× | "
            + " | ".join("" for _ in names[1:]) + (" | " if len(names) > 1 else "")
            + "≤ 0.5 s |")
        say()
        idle_off = median_of(results["bridge"], "idle_rss")
        say(f"Idle RSS with the status server on (`status.listen` set, hypercorn loaded): "
            f"{idle_on:.1f} MB ({'✓' if idle_on <= 40 else '✗'} ≤ 40 MB; status off: "
            f"{idle_off:.1f} MB; medians of {args.runs}).")
        say()
        say("Throughput = 20,000 / (last POST at the sink − first alarm published). CPU = the "
            "target process's user+sys time (psutil) from the first publish to the last POST, / "
            "20,000. Latency = sink receive time − `sent_ns` in the payload (same clock). The "
            "bridge POSTs through `sinks/http11.Http11Pool`, its default for an http:// backend. "
            "`load` = the 1-minute load average when the run started (2 cores; other work on "
            "the machine inflates latency tails).")
        say()
        say("### Every run")
        say()
        say(per_run(results))
        say()
        if not args.no_http_clients:
            say("## HTTP clients: CPU per POST (bench/http_clients.py; 4 lanes, keep-alive, to "
                "the bench sink; medians of 3)")
            say()
            say("A micro-benchmark of the clients alone, not the bridge: why the backend hot "
                "path uses `http11` (sinks/http11.Http11Pool) and httpx only for https and "
                "verify.")
            say()
            say("| client | CPU µs/POST | POST/s |")
            say("|---|---:|---:|")
            for row in http_clients(sink, 6000):
                say(f"| {row['kind']} | {row['cpu_us_per_post']:.0f} | "
                    f"{row['posts_per_s']:,.0f} |")
            say()
        if not args.no_profile and shutil.which("py-spy"):
            for t in targets:
                if t.name == "naive":
                    continue
                prof = RESULTS / f"profile-{t.name}.txt"
                r = run_once(t, sink, 90 + len(t.name), profile=prof)
                say(f"## Profile of one burst: {t.name} (py-spy, 200 Hz; "
                    f"{r.throughput:,.0f} msg/s under the profiler)")
                say()
                say(summarize_profile(prof) if prof.exists() else "(py-spy wrote nothing)")
                say()
        elif not args.no_profile:
            say("(py-spy not installed: `pip install py-spy` for the profile)")
        say(f"_bench took {time.monotonic() - started:.0f} s_")
    finally:
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    (RESULTS / "latest.md").write_text("\n".join(report) + "\n")
    print(f"\nwrote {(RESULTS / 'latest.md').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
