"""[redis] settings, Redis URL forms, failure causes and the memory bound of dead letters
(no sockets)."""

from __future__ import annotations

import hashlib
import socket
import ssl

import pytest

from botonera_bridge.config import from_mapping
from botonera_bridge.errors import ConfigError, RedisError, RedisReplyError
from botonera_bridge.metrics import Metrics
from botonera_bridge.queues.link import RedisLink
from botonera_bridge.queues.outbox import MEMORY_DEAD_BYTES, DeadLetters
from botonera_bridge.queues.redis_client import Redis, cause


def test_defaults_and_keys() -> None:
    r = from_mapping({}).redis
    assert (r.timeout, r.ca_file, r.sentinels, r.sentinel_master, r.dead_max) == (
        1.0,
        "",
        (),
        "",
        10000,
    )
    s = from_mapping(
        {"redis": {"url": "rediss://h:6380/1", "sentinels": ["a:26379"], "sentinel_master": "m"}}
    )
    assert s.redis.sentinels == ("a:26379",)


@pytest.mark.parametrize(
    ("redis", "key"),
    [
        ({"url": "http://localhost:6379"}, "redis.url"),
        ({"url": "localhost:6379"}, "redis.url"),
        ({"timeout": 0}, "redis.timeout"),
        ({"dead_max": 0}, "redis.dead_max"),
        ({"sentinels": ["a:26379"]}, "redis.sentinel_master"),
    ],
)
def test_invalid_redis_settings_are_config_errors(redis: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"redis": redis})
    assert info.value.key == key


def test_url_forms_and_masked_address() -> None:
    r = Redis("redis://bridge:pw-canary@10.0.0.5:6390/3")
    assert (r.host, r.port, r.db) == ("10.0.0.5", 6390, 3)
    assert "pw-canary" not in r.address
    assert "bridge" not in r.address
    u = Redis("unix:///run/redis/redis.sock?db=2")
    assert (u.unix_path, u.db) == ("/run/redis/redis.sock", 2)
    assert u.address == "unix:/run/redis/redis.sock?db=2"
    t = Redis("rediss://:pw-canary@example.net:6380/0")
    assert t.address == "example.net:6380/0 (TLS)"
    s = Redis("redis:///0", sentinels=["10.0.0.1:26379", "10.0.0.2"], sentinel_master="mymaster")
    assert s.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert s.address.startswith("sentinel master mymaster")
    with pytest.raises(RedisError):
        Redis("memcached://x")
    with pytest.raises(RedisError):
        Redis("redis:///0", sentinels=["a:1"])
    with pytest.raises(RedisError):
        Redis("rediss://h/0", ca_file="/nonexistent/ca.pem")


def _wrapped(inner: BaseException) -> RedisError:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RedisError("cannot connect to Redis at h:1: boom") from exc
    except RedisError as err:
        return err


def test_causes_name_what_an_operator_fixes() -> None:
    assert cause(_wrapped(ConnectionRefusedError(111, "refused"))) == "conexión rechazada"
    group = OSError("all attempts failed")
    group.__cause__ = ExceptionGroup("x", [ConnectionRefusedError(111, "refused")])
    assert cause(_wrapped(group)) == "conexión rechazada"
    assert cause(_wrapped(socket.gaierror(-2, "Name or service not known"))) == "host desconocido"
    cert = ssl.SSLCertVerificationError("verify failed")
    cert.verify_message = "unable to get local issuer certificate"
    assert cause(_wrapped(cert)).startswith("certificado no válido: unable to get local")
    auth = _wrapped(RedisReplyError("WRONGPASS invalid username-password pair"))
    assert cause(auth) == "credenciales rechazadas (WRONGPASS)"
    slow = RedisError("cannot connect to Redis at h:1: no answer within 2s")
    assert cause(slow) == "sin respuesta en 2s"


async def test_memory_dead_letters_are_bounded_and_keep_length_and_hash() -> None:
    metrics = Metrics()
    dead = DeadLetters(RedisLink(None), "x:dead", metrics, max_payload=65536, dead_max=10000)
    payload = b"z" * (1 << 20)
    for i in range(300):
        await dead.add("too_large", "big", payload=payload[:-4] + b"%04d" % i)
    assert dead.memory_bytes <= MEMORY_DEAD_BYTES
    assert 200 < len(dead.memory) < 300
    assert dead.trimmed == 300 - len(dead.memory)
    last = dead.memory[-1]
    assert last.length == 1 << 20
    assert last.sha256 == hashlib.sha256(payload[:-4] + b"0299").hexdigest()
    assert len(last.payload) == 65536
    assert "truncated to 65536 of 1048576 bytes" in last.detail
    sample = metrics.registry.get_sample_value(
        "botonera_dead_letters_trimmed_total", {"where": "memory"}
    )
    assert sample == dead.trimmed


async def test_memory_dead_letters_also_capped_by_count() -> None:
    dead = DeadLetters(RedisLink(None), "x:dead", dead_max=50)
    for i in range(120):
        await dead.add("invalid_json", "bad", payload=b"{%d" % i)
    assert len(dead.memory) == 50
    assert dead.memory[0].payload == "{70"
