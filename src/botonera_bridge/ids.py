"""Identifiers: validation of empresa/sede/dispositivo, event ids, phone numbers
(E.164 validation, and the one masking helper every log line goes through)."""

from __future__ import annotations

import hashlib
import os
import re
import time
import unicodedata
from typing import Final

_ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_E164: Final = re.compile(r"^\+[1-9][0-9]{6,14}$")
_DIGIT_RUN: Final = re.compile(r"\d{7,}")  # a phone number inside a longer text


class IdentifierError(ValueError):
    """Raised when an empresa, sede or dispositivo cannot be used in topics, keys or logs."""


def fold(text: str) -> str:
    """Lower-case and strip accents: 'Tocancipá' -> 'tocancipa'."""
    text = text.strip().lower()
    if text.isascii():  # NFKD leaves ASCII as it is: three per message skip the walk below
        return text
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def normalize_id(value: object, field: str = "empresa") -> str:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise IdentifierError(f"{field} must be a string, got {type(value).__name__}")
    folded = fold(str(value)).replace(" ", "_")
    if not _ID_RE.match(folded):
        raise IdentifierError(f"{field} {str(value)[:80]!r} is not a valid identifier")
    return folded


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562), so fresh event ids sort by arrival."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return _uuid_text(value.to_bytes(16, "big"))


def stable_id(*parts: str) -> str:
    """A UUID-shaped id derived from the message's own identity (same input, same id)."""
    digest = bytearray(hashlib.sha256("\x1f".join(parts).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8: custom
    digest[8] = (digest[8] & 0x3F) | 0x80
    return _uuid_text(digest)


def _uuid_text(raw: bytes | bytearray) -> str:
    """str(uuid.UUID(bytes=raw)) without the uuid module (0.9 MB of idle RSS) or its
    object: this runs for every message."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_e164(number: str) -> bool:
    """'+573001112233': a plus, then 7 to 15 digits, the first not 0."""
    return _E164.match(number) is not None


def as_e164(number: str) -> str | None:
    """'573001112233' or '+573001112233' -> '+573001112233'; None when not a number."""
    number = number if number.startswith("+") else f"+{number}"
    return number if is_e164(number) else None


def message_ref(message_id: str) -> str:
    """A WhatsApp message id fit for logs: WAHA ids embed the sender's number
    ('false_57300…@c.us_X'), Cloud API ids ('wamid.HBgM…') embed it base64-encoded,
    so those become a short digest."""
    if message_id.startswith("wamid."):
        return "wamid#" + hashlib.sha256(message_id.encode()).hexdigest()[:12]
    return _DIGIT_RUN.sub(lambda m: mask_phone(m.group()), message_id)


def mask_phone(number: str) -> str:
    """'+573001112233' -> '+57******2233': enough to tell contacts apart, no more."""
    digits = re.sub(r"\D", "", number)
    if len(digits) <= 6:
        return "*" * len(digits)
    return f"+{digits[:2]}{'*' * (len(digits) - 6)}{digits[-4:]}"
