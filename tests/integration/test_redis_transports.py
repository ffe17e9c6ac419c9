"""Issue 11, must-show 4: the bridge on every Redis a real site runs.

TLS only (`--tls-port`, a CA and server certificate made here with openssl), a unix
socket only, an ACL user with the default user disabled, and Sentinel (one master, one
replica, one sentinel: the master SIGKILLed mid-stream, the replica promoted, the
bridge follows, 0 lost, duplicates only with the same Idempotency-Key). Plus the
check-config causes: refused, unknown host, bad credentials, certificate.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from tests.faults.conftest import (
    PacedPublisher,
    alarms,
    keys_by_seq,
    metrics,
    wait_all_seqs,
)
from tests.support.bridge import wait_until
from tests.support.procs import _Proc, _which, free_port

from botonera_bridge.config import RedisSettings
from botonera_bridge.queues.redis_client import probe

PASSWORD = "s3cret-acl"  # noqa: S105 - a throwaway test password, not a real credential


class RedisProc(_Proc):
    """redis-server with any arguments; ready once ``ready()`` says so."""

    name = "redis"

    def __init__(self, args: list[str], ready: Callable[[RedisProc], bool]) -> None:
        super().__init__()
        self.args = args
        self._ready = ready

    def argv(self) -> list[str]:
        return [
            _which("redis-server"),
            *[a.format(port=self.port, dir=self.dir) for a in self.args],
        ]

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
            try:
                if self._ready(self):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"redis-server not ready: {self.log.read_text()[-2000:]}")


def _resp(sock: Any, *cmd: str) -> bytes:
    sock.sendall(
        b"".join([b"*%d\r\n" % len(cmd)] + [b"$%d\r\n%s\r\n" % (len(c), c.encode()) for c in cmd])
    )
    return sock.recv(65536)


def cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10
    ).stdout.strip()


@pytest.fixture
def started(server_binaries) -> Iterator[Callable[[RedisProc], RedisProc]]:
    if server_binaries["redis"] is None:
        pytest.skip("redis-server is not installed")
    procs: list[RedisProc] = []

    def start(p: RedisProc) -> RedisProc:
        procs.append(p)
        p.start()
        return p

    yield start
    for p in procs:
        p.cleanup()


def make_certs(d: Path) -> dict[str, Path]:
    """A CA, and a server certificate it signs for 127.0.0.1 (SAN IP) and localhost."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=botonera test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.crt",
        "-days",
        "2",
        "-subj",
        "/CN=some other CA",
    )
    out = {n: d / f"{n}.crt" for n in ("ca", "server", "other")}
    return out | {"key": d / "server.key"}


def _tls_ready(ca: Path) -> Callable[[RedisProc], bool]:
    def ready(p: RedisProc) -> bool:
        ctx = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection(("127.0.0.1", p.port), timeout=1) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                return _resp(s, "PING").startswith(b"+PONG")

    return ready


def tls_redis(started, certs: dict[str, Path]) -> RedisProc:
    args = ["--port", "0", "--tls-port", "{port}", "--bind", "127.0.0.1", "--dir", "{dir}",
            "--save", "", "--tls-cert-file", str(certs["server"]),
            "--tls-key-file", str(certs["key"]), "--tls-ca-cert-file", str(certs["ca"]),
            "--tls-auth-clients", "no"]  # fmt: skip
    return started(RedisProc(args, _tls_ready(certs["ca"])))


def unix_redis(started) -> RedisProc:
    def ready(p: RedisProc) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(p.dir / "redis.sock"))
            return _resp(s, "PING").startswith(b"+PONG")

    args = ["--port", "0", "--unixsocket", "{dir}/redis.sock", "--unixsocketperm", "700",
            "--dir", "{dir}", "--save", ""]  # fmt: skip
    return started(RedisProc(args, ready))


def acl_redis(started) -> RedisProc:
    def ready(p: RedisProc) -> bool:
        with socket.create_connection(("127.0.0.1", p.port), timeout=1) as s:
            return _resp(s, "AUTH", "bridge", PASSWORD).startswith(b"+OK") and (
                _resp(s, "PING").startswith(b"+PONG")
            )

    args = ["--port", "{port}", "--bind", "127.0.0.1", "--dir", "{dir}", "--save", "",
            "--user", "default", "off",
            "--user", "bridge", "on", f">{PASSWORD}", "~botonera:*", "&*", "+@all"]  # fmt: skip
    return started(RedisProc(args, ready))


def _deliver_20(bridge_factory, backend, publisher, redis_conf: dict[str, Any]) -> None:
    bridge = bridge_factory(conf={"redis": redis_conf}).start()
    wait_until(lambda: metrics(bridge).get("botonera_redis_connected") == 1.0, 10, "on Redis")
    publisher.publish_all(alarms(20))
    wait_all_seqs(backend, set(range(20)), timeout=20)
    assert metrics(bridge)["botonera_redis_connected"] == 1.0
    log = bridge.log_text()
    assert "Redis unavailable" not in log, log[-2000:]
    assert "redis=up" in log
    if PASSWORD in redis_conf["url"]:
        assert PASSWORD not in log


def test_tls_only_redis_with_ca_file(bridge_factory, backend, publisher, started, tmp_path):
    certs = make_certs(tmp_path)
    r = tls_redis(started, certs)
    url = f"rediss://127.0.0.1:{r.port}/0"
    _deliver_20(bridge_factory, backend, publisher, {"url": url, "ca_file": str(certs["ca"])})

    async def causes() -> dict[str, tuple[bool, str, str]]:
        return {
            "ok": await probe(RedisSettings(url=url, ca_file=str(certs["ca"]))),
            "bad_ca": await probe(RedisSettings(url=url, ca_file=str(certs["other"]))),
            "plain": await probe(RedisSettings(url=f"redis://127.0.0.1:{r.port}/0")),
        }

    got = trio.run(causes)
    assert got["ok"][0], got
    assert "TLS" in got["ok"][1]
    assert not got["bad_ca"][0]
    assert got["bad_ca"][2].startswith("certificado no válido"), got["bad_ca"]
    assert not got["plain"][0], got["plain"]


def test_unix_socket_only_redis(bridge_factory, backend, publisher, started):
    r = unix_redis(started)
    _deliver_20(bridge_factory, backend, publisher, {"url": f"unix://{r.dir}/redis.sock?db=0"})


def test_acl_user_and_check_causes(bridge_factory, backend, publisher, started):
    r = acl_redis(started)
    url = f"redis://bridge:{PASSWORD}@127.0.0.1:{r.port}/0"
    _deliver_20(bridge_factory, backend, publisher, {"url": url})

    async def causes() -> dict[str, tuple[bool, str, str]]:
        return {
            "bad_pw": await probe(RedisSettings(url=f"redis://bridge:wrong@127.0.0.1:{r.port}/0")),
            "refused": await probe(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0")),
            "unknown": await probe(RedisSettings(url="redis://no-such-host.invalid:6379/0")),
        }

    bad = bridge_factory(conf={"redis": {"url": f"redis://bridge:wrong@127.0.0.1:{r.port}/0"}})
    out = bad.cli("check-config")
    assert out.returncode == 1, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("✗ Redis"))
    assert line == f"✗ Redis 127.0.0.1:{r.port}/0: credenciales rechazadas (WRONGPASS)", line

    got = trio.run(causes)
    assert got["bad_pw"][2].startswith("credenciales rechazadas"), got
    assert got["refused"][2] == "conexión rechazada", got
    assert got["unknown"][2] == "host desconocido", got
    for ok, name, detail in got.values():
        assert not ok
        assert "wrong" not in name + detail
        assert PASSWORD not in name + detail


def sentinel_setup(started) -> tuple[RedisProc, RedisProc, RedisProc]:
    def pong(p: RedisProc) -> bool:
        return cli(p.port, "PING") == "PONG"

    base = ["--bind", "127.0.0.1", "--dir", "{dir}", "--save", "", "--appendonly", "no"]
    master = started(RedisProc(["--port", "{port}", *base], pong))
    replica = started(
        RedisProc(["--port", "{port}", *base, "--replicaof", "127.0.0.1", str(master.port)], pong)
    )
    wait_until(
        lambda: "master_link_status:up" in cli(replica.port, "INFO", "replication"),
        10,
        "the replica in sync",
    )
    port = free_port()
    conf = Path(master.dir) / f"sentinel-{port}.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {master.dir}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 5000\n"
        "sentinel parallel-syncs mymaster 1\n"
    )
    sentinel = RedisProc([str(conf), "--sentinel"], pong)
    sentinel.port = port
    started(sentinel)
    wait_until(
        lambda: str(replica.port) in cli(port, "SENTINEL", "replicas", "mymaster"),
        15,
        "the sentinel to know the replica",
    )
    return master, replica, sentinel


@pytest.mark.slow
def test_sentinel_failover_mid_stream_loses_nothing(bridge_factory, backend, publisher, started):
    master, replica, sentinel = sentinel_setup(started)
    bridge = bridge_factory(
        conf={
            "redis": {
                "url": "redis://127.0.0.1/0",  # host and port come from Sentinel
                "sentinels": [f"127.0.0.1:{sentinel.port}"],
                "sentinel_master": "mymaster",
            }
        }
    ).start()
    wait_until(lambda: metrics(bridge).get("botonera_redis_connected") == 1.0, 10, "on Redis")
    n = 300
    pub = PacedPublisher(publisher, alarms(n), rate=50)
    pub.start()
    wait_until(lambda: pub.published >= 0.3 * n, 30, "30% published")
    # each append waited for the replica (WAIT): what was acknowledged survives the kill
    assert "cmdstat_wait:" in cli(master.port, "INFO", "commandstats")
    master.kill()
    killed = time.monotonic()
    wait_until(
        lambda: (
            cli(sentinel.port, "SENTINEL", "get-master-addr-by-name", "mymaster").split()[-1:]
            == [str(replica.port)]
        ),
        30,
        "Sentinel to promote the replica",
    )
    promoted = time.monotonic() - killed
    pub.finish(60)
    wait_all_seqs(backend, set(range(n)), timeout=60)
    assert all(len(k) == 1 for k in keys_by_seq(backend).values()), "a duplicate with a new key"
    wait_until(
        lambda: (
            f"Redis is back (sentinel master mymaster (127.0.0.1:{replica.port}"
            in bridge.log_text()
        ),
        20,
        "the bridge on the new master",
    )
    assert bridge.running()
    assert "died; restarting" not in bridge.log_text()
    assert int(cli(replica.port, "XLEN", "botonera:outbox")) >= 0
    groups = cli(replica.port, "XINFO", "GROUPS", "botonera:outbox")
    assert "backend" in groups
    dups = sum(1 for a in backend.requests() if (a["payload"] or {}).get("seq") is not None) - n
    print(f"11.4 sentinel: promoted {promoted:.1f}s after the kill; {dups} repeated POSTs")


def test_settings_struct_has_the_contract_keys() -> None:
    keys = {f.name for f in msgspec.structs.fields(RedisSettings)}
    assert {
        "url",
        "prefix",
        "timeout",
        "ca_file",
        "sentinels",
        "sentinel_master",
        "dead_max",
    } <= keys
    assert RedisSettings().timeout == 1.0
    assert RedisSettings().dead_max == 10000
