"""What may be printed: URLs without their secrets, outside text without control characters.

``mask_url`` is the one place a URL is made printable (logs, ``last_error``,
``/api/status``, ``check-config``): a password or user in the userinfo and the
value of any query parameter that looks like a credential become ``****``.
``mask_urls_in`` does the same for every URL inside a free text (an exception
message). ``escape`` makes text that came from outside (payloads, topics,
server answers) safe for one log line: no newline or control character reaches
the log raw, so a panel cannot forge a line.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MASK: Final = "****"
# query parameters whose value is a credential (compared lower-cased, "-" as "_")
SECRET_PARAMS: Final = frozenset(
    {
        "token", "access_token", "auth", "authorization", "key", "api_key", "apikey",
        "x_api_key", "password", "pass", "passwd", "pwd", "secret", "client_secret",
        "app_secret", "signature", "sig",
    }
)  # fmt: skip
_URL_IN_TEXT: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# C0, DEL, C1, and the Unicode line/paragraph separators: each starts a line somewhere
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
ESCAPE_LIMIT: Final = 500  # characters of outside text kept in one log line


def _secret_param(name: str) -> bool:
    return name.strip().lower().replace("-", "_") in SECRET_PARAMS


def mask_url(url: str) -> str:
    """``redis://:pw@h:6379/0`` -> ``redis://:****@h:6379/0``; ``wss://h/ws?x-api-key=k``
    -> ``wss://h/ws?x-api-key=****``. Never raises: an unparsable URL is masked whole
    after its scheme."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _password = userinfo.partition(":")
            # a user with a password keeps its name; a lone userinfo may be a token
            netloc = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(_secret_param(k) for k, _ in pairs):
                query = "&".join(
                    f"{quote(k, safe='-_.')}={MASK if _secret_param(k) else quote(v, safe='-_.:/')}"
                    for k, v in pairs
                )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        scheme, sep, _ = url.partition("://")
        return f"{scheme}{sep}{MASK}" if sep else MASK


def mask_urls_in(text: str) -> str:
    """Every URL inside ``text`` masked with :func:`mask_url`."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def _escape_char(m: re.Match[str]) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escape(text: object, limit: int = ESCAPE_LIMIT) -> str:
    """``text`` for one log line: control characters as ``\\xNN``, cut at ``limit``."""
    s = text if isinstance(text, str) else str(text)
    if len(s) > limit:
        s = s[:limit] + f"…(+{len(s) - limit})"
    return _CONTROL.sub(_escape_char, s)
