"""The RESP reply parser against hostile bytes: truncated, oversized, wrong-type and garbage
replies never hang or crash it (issue 11, "a fuzz test of the reply parser").

Seeded and table-driven (no extra dependency): a few thousand byte strings built from
valid replies, cut, flipped, inflated and nested, fed to the parser whole and byte by
byte. Each either parses, asks for more bytes, or raises RedisError; nothing else.
Then the same kind of replies from a real loopback server, through the client and a
DurableStream: every call ends within its deadline with a value or a RedisError.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from botonera_bridge.errors import RedisError, RedisReplyError
from botonera_bridge.queues import redis_client
from botonera_bridge.queues.link import RedisLink
from botonera_bridge.queues.redis_client import MAX_BUFFER, Redis, parse_reply
from botonera_bridge.queues.streams import DurableStream

VALID = [
    b"+OK\r\n",
    b"-ERR wrong\r\n",
    b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
    b":42\r\n",
    b"$5\r\nhello\r\n",
    b"$-1\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b"*2\r\n$1\r\na\r\n:1\r\n",
    # an XREADGROUP reply
    b"*1\r\n*2\r\n$1\r\nk\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nd\r\n$2\r\nxy\r\n",
]
HOSTILE = [
    b"$99999999999\r\n",  # oversized bulk
    b"*99999999999\r\n",  # oversized array
    b"$-7\r\n",
    b"*-2\r\n",
    b"$abc\r\n",
    b":12x\r\n",
    b"$3\r\nabcdef\r\n",  # bulk not ended by CRLF
    b"*1\r\n" * 40 + b":1\r\n",  # nested too deep
    b"%1\r\n+a\r\n+b\r\n",  # RESP3 map: never asked for
    b"\x00\xff\r\n",
    b"\r\n",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 1 and b:  # flip a byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:  # insert garbage
            pos = rng.randint(0, len(b))
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:  # splice another reply in
            pos = rng.randint(0, len(b))
            b[pos:pos] = rng.choice(VALID + HOSTILE)
        else:  # inflate a length
            b = bytearray(bytes(b).replace(b"$", b"$9", 1))
    return bytes(b)


def cases(n: int, seed: int = 1234) -> list[bytes]:
    rng = random.Random(seed)
    out = VALID + HOSTILE
    while len(out) < n:
        out.append(mutate(rng, rng.choice(VALID + HOSTILE)))
    return out


def feed(data: bytes) -> list[Any]:
    """Parse as a connection would, chunk by chunk; returns what parsed."""
    buf = bytearray()
    values = []
    for i in range(0, len(data), 3):
        buf += data[i : i + 3]
        while buf:
            got = parse_reply(buf)
            if got is None:
                break
            value, pos = got
            del buf[:pos]
            values.append(value)
    return values


@pytest.mark.parametrize("chunk", [0, 1])
def test_parser_only_parses_waits_or_raises_redis_error(chunk: int) -> None:
    for data in cases(3000):
        try:
            if chunk:
                feed(data)
            else:
                parse_reply(bytearray(data))
        except RedisError:
            pass


def test_hostile_lengths_are_rejected_at_once() -> None:
    for data in HOSTILE[:9]:
        with pytest.raises(RedisError):
            parse_reply(bytearray(data))


def test_buffer_without_an_end_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_BUFFER >= 64 << 20
    monkeypatch.setattr(redis_client, "MAX_BUFFER", 1000)
    assert parse_reply(bytearray(b"+" + b"a" * 999)) is None
    with pytest.raises(RedisError):
        parse_reply(bytearray(b"+" + b"a" * 2000))


def test_valid_replies_parse_to_values() -> None:
    got = feed(b"".join(VALID))
    assert got[0] == b"OK"
    assert isinstance(got[1], RedisReplyError)
    assert got[2].code == "OOM"
    assert got[3:8] == [42, b"hello", None, None, []]
    assert got[-1] == [[b"k", [[b"1-0", [b"d", b"xy"]]]]]


# -- the same through a real socket -------------------------------------------------------


async def hostile_server(listeners: list[trio.SocketListener], replies: list[bytes]) -> None:
    """Answers each command with the next reply (then closes); commands are not parsed."""
    it = iter(replies)

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while await stream.receive_some(65536):
                    reply = next(it, None)
                    if reply is None:
                        return
                    await stream.send_all(reply)
            except trio.BrokenResourceError:
                return

    await trio.serve_listeners(serve, listeners)


async def test_client_and_stream_end_every_call_on_hostile_replies() -> None:
    rng = random.Random(99)
    replies = [mutate(rng, rng.choice(VALID + HOSTILE)) for _ in range(200)]
    replies += [b"*1\r\n*2\r\n$1\r\nk\r\n:7\r\n", b":1\r\n", b"$2\r\nno\r\n"] * 10  # wrong types
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    outcomes = {"value": 0, "error": 0}
    async with trio.open_nursery() as n:
        n.start_soon(hostile_server, listeners, replies)
        redis = Redis(f"redis://127.0.0.1:{port}/0", timeout=0.05)
        link = RedisLink(redis)
        link.up = True
        stream = DurableStream(link, "t", ("a",), consumer="c", memory_limit=10_000)
        with trio.fail_after(60):  # each call has its own 50 ms deadline; this is a ceiling
            for i in range(len(replies)):
                try:
                    if i % 3 == 0:
                        await redis.execute("PING")
                    elif i % 3 == 1:
                        await stream.append([(b"x", "")])
                    else:
                        await stream.maintain()
                    outcomes["value"] += 1
                except RedisError:
                    outcomes["error"] += 1
                link.up = True  # keep talking to it: every call must end by itself
        await redis.aclose()
        n.cancel_scope.cancel()
    assert outcomes["error"] > 50, outcomes
