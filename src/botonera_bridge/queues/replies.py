"""Reading Redis stream replies: entries, field pairs, ids; a reply of the wrong shape
(a hostile or broken server) is a :class:`~botonera_bridge.errors.RedisError`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, Final, ParamSpec, TypeVar

from ..errors import RedisError

_P = ParamSpec("_P")
_T = TypeVar("_T")
# what indexing or decoding a reply of the wrong shape raises
REPLY_SHAPE_ERRORS: Final = (TypeError, ValueError, IndexError, KeyError, AttributeError)

Entry = tuple[str, dict[bytes, bytes]]  # a stream entry: id and its fields


def reply_shape(
    fn: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """A reply of an unexpected shape raised inside ``fn`` becomes a RedisError."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await fn(*args, **kwargs)
        except REPLY_SHAPE_ERRORS as exc:
            raise RedisError(f"unexpected Redis reply in {fn.__name__}: {exc!r}") from exc

    return wrapper


def pairs(flat: list[Any]) -> dict[bytes, Any]:
    """A flat ``[field, value, …]`` reply as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def id_key(stream_id: str) -> tuple[int, int]:
    """A stream id as a sortable (milliseconds, sequence)."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def entry_list(raw: list[Any] | None) -> list[Entry]:
    """The entries of an XRANGE/XCLAIM-shaped reply; entries deleted while pending
    (fields nil) are left out."""
    out = []
    for eid, flat in raw or []:
        if flat is None:
            continue
        out.append((eid.decode(), pairs(flat)))
    return out


def stream_entries(reply: list[Any] | None) -> list[Entry]:
    """The entries of a one-stream XREADGROUP reply (nil: none)."""
    if not reply:
        return []
    _, raw = reply[0]
    return entry_list(raw)
