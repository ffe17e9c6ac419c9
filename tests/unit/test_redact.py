"""Secrets inside URLs and control characters in outside text never reach a log raw."""

from __future__ import annotations

import logging

import pytest

from botonera_bridge.log import TextFormatter
from botonera_bridge.redact import escape, mask_url, mask_urls_in


@pytest.mark.parametrize(
    ("url", "secret", "kept"),
    [
        ("redis://:pw-canary@127.0.0.1:6379/0", "pw-canary", "127.0.0.1:6379/0"),
        ("redis://user:pw-canary@h:1/0", "pw-canary", "redis://user:****@h:1/0"),
        ("https://user:pw-canary@backend.example/x", "pw-canary", "backend.example/x"),
        ("https://tok-canary@backend.example/", "tok-canary", "backend.example"),
        ("wss://gw.example/ws?x-api-key=key-canary&session=s1", "key-canary", "session=s1"),
        ("ws://gw/ws?token=tok-canary", "tok-canary", "ws://gw/ws?token=****"),
        ("http://h/?X-Api-Key=k-canary", "k-canary", "X-Api-Key=****"),
        ("http://h:8000", "", "http://h:8000"),
    ],
)
def test_mask_url(url: str, secret: str, kept: str) -> None:
    out = mask_url(url)
    if secret:
        assert secret not in out
    assert kept in out


def test_mask_urls_in_text_and_bad_urls() -> None:
    text = "cannot reach https://u:pw-canary@h:443/x: ConnectError('ws://g?token=t-canary')"
    out = mask_urls_in(text)
    assert "pw-canary" not in out
    assert "t-canary" not in out
    assert "cannot reach https://u:****@h:443/x" in out
    assert "canary" not in mask_url("http://u:canary@[::1")


def test_escape_and_formatter_keep_one_line() -> None:
    forged = "alarmas\n2026-01-01 00:00:00 CRITICAL fake: pwned\r\x1b[2J\u2028"
    assert "\n" not in escape(forged)
    assert "\x1b" not in escape(forged)
    assert escape("Tocancipá") == "Tocancipá"
    assert len(escape("x" * 2000, 100)) < 120
    record = logging.makeLogRecord({"msg": "got %s", "args": (forged,), "levelname": "ERROR"})
    line = TextFormatter("%(levelname)s %(message)s").format(record)
    for char in ("\n", "\r", "\u2028"):
        assert char not in line
