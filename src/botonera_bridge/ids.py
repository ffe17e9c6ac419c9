"""Identifiers: validation of empresa/sede/dispositivo, event ids, phone masking."""

from __future__ import annotations

import hashlib
import os
import re
import time
import unicodedata
from typing import Final

_ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class IdentifierError(ValueError):
    """Raised when an empresa, sede or dispositivo cannot be used in topics, keys or logs."""


def fold(text: str) -> str:
    """Lower-case and strip accents: 'Tocancipá' -> 'tocancipa'."""
    decomposed = unicodedata.normalize("NFKD", text.strip().lower())
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


def mask_phone(number: str) -> str:
    """'+573001112233' -> '+57******2233': enough to tell contacts apart, no more."""
    digits = re.sub(r"\D", "", number)
    if len(digits) <= 6:
        return "*" * len(digits)
    return f"+{digits[:2]}{'*' * (len(digits) - 6)}{digits[-4:]}"
