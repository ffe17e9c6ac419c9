"""Meta's side of the Cloud API webhook, for tests: signed POSTs to a running bridge.

    hook = MetaWebhook(f"http://127.0.0.1:{bridge.status_port}", secret)
    hook.verify("verify-token", "1234")         # -> (status, body)
    hook.status("wamid.X", "read", "573001112233")
    hook.message("wamid.Y", "573004445566", "ACK", secret="wrong")   # -> 403

Bodies have the shape of ``../shared/samples/cloud-webhooks.jsonl``.

:func:`record_message_ids` makes a FakeWhatsApp remember the message id it answered
each send with (the id statuses refer to), without touching the fake server's code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from tests.servers import whatsapp_api
from tests.servers.whatsapp_api import FakeWhatsApp

PATH = "/webhooks/whatsapp"


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def envelope(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922",
                            },
                            **value,
                        },
                    }
                ],
            }
        ],
    }


class MetaWebhook:
    def __init__(self, base_url: str, secret: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.secret = secret

    def _call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(  # noqa: S310 - loopback test server
            self.base_url + path, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            data = exc.read()
            exc.close()
            return exc.code, data

    def verify(self, token: str, challenge: str) -> tuple[int, bytes]:
        query = urllib.parse.urlencode(
            {"hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": challenge}
        )
        return self._call("GET", f"{PATH}?{query}")

    def post(self, obj: dict[str, Any], *, secret: str | None = None) -> tuple[int, bytes]:
        body = json.dumps(obj).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": sign(body, self.secret if secret is None else secret),
        }
        return self._call("POST", PATH, body, headers)

    def message(
        self, message_id: str, from_digits: str, text: str, *, secret: str | None = None
    ) -> tuple[int, bytes]:
        item = {
            "from": from_digits,
            "id": message_id,
            "timestamp": str(int(time.time())),
            "type": "text",
            "text": {"body": text},
        }
        contacts = [{"profile": {"name": "Contacto"}, "wa_id": from_digits}]
        return self.post(envelope({"contacts": contacts, "messages": [item]}), secret=secret)

    def status(
        self, message_id: str, status: str, recipient_digits: str, *, secret: str | None = None
    ) -> tuple[int, bytes]:
        item = {
            "id": message_id,
            "status": status,
            "timestamp": str(int(time.time())),
            "recipient_id": recipient_digits,
        }
        return self.post(envelope({"statuses": [item]}), secret=secret)


def record_message_ids(wa: FakeWhatsApp) -> list[tuple[str, str]]:
    """From now on, ``wa`` appends (recipient digits, message id) for each accepted send."""
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()
    base = wa._server.RequestHandlerClass  # noqa: SLF001 - observing, not changing, the fake

    class Recording(base):  # type: ignore[misc,valid-type]
        def _answer(self, call: int, cfg: Any, body: Any) -> Any:
            status, answer, extra = super()._answer(call, cfg, body)
            if status < 300 and isinstance(body, dict):
                waha = self.path == "/api/sendText"
                number = whatsapp_api._number(body, waha)  # noqa: SLF001
                mid = answer["id"]["_serialized"] if waha else answer["messages"][0]["id"]
                with lock:
                    seen.append((number, mid))
            return status, answer, extra

    wa._server.RequestHandlerClass = Recording  # noqa: SLF001
    return seen
