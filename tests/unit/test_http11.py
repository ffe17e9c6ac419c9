"""Http11Pool without sockets: URL checks, error fields, a closed pool."""

from __future__ import annotations

import pytest
import trio

from botonera_bridge.errors import BridgeError
from botonera_bridge.sinks.http11 import (
    Http11Pool,
    HttpError,
    HttpTimeout,
    UnsupportedUrl,
    open_pool,
)


def pool(url: str = "http://127.0.0.1:9/base/") -> Http11Pool:
    return Http11Pool(url, max_connections=2, connect_timeout=1.0, read_timeout=1.0)


@pytest.mark.parametrize(
    "url", ["https://backend.example/", "ftp://x/", "127.0.0.1:8000", "http:///nohost", "http://h/?q=1"]
)
def test_only_plain_http_is_accepted(url: str) -> None:
    with pytest.raises(UnsupportedUrl) as info:
        pool(url)
    assert info.value.url == url
    assert url in str(info.value)
    assert isinstance(info.value, HttpError)
    assert isinstance(info.value, BridgeError)


def test_https_error_tells_the_caller_what_to_do() -> None:
    with pytest.raises(UnsupportedUrl, match="use httpx"):
        pool("https://backend.example")


def test_max_connections_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        Http11Pool("http://h", max_connections=0, connect_timeout=1, read_timeout=1)


def test_base_url_parts() -> None:
    p = pool("http://user@backend.local:8080/prefix/")
    assert (p.host, p.port) == ("backend.local", 8080)
    assert p._prefix == "/prefix"
    assert p._host_header == b"backend.local:8080"
    assert pool("http://backend.local").port == 80


def test_timeout_error_fields() -> None:
    exc = HttpTimeout("no answer within 1s", url="http://h/x", phase="read")
    assert (exc.url, exc.phase) == ("http://h/x", "read")
    assert str(exc) == "no answer within 1s (http://h/x)"


async def test_closed_pool_refuses_requests() -> None:
    async with open_pool("http://127.0.0.1:9", max_connections=1, connect_timeout=1,
                         read_timeout=1) as p:  # fmt: skip
        pass
    with pytest.raises(trio.ClosedResourceError):
        await p.post("/x", b"{}", [])
