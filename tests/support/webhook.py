"""Meta's side of the Cloud API webhook, for tests: signed POSTs to a running bridge.

    hook = MetaWebhook(f"http://127.0.0.1:{bridge.status_port}", secret)
    hook.verify("verify-token", "1234")         # -> (status, body)
    hook.status("wamid.X", "read", "573001112233")
    hook.message("wamid.Y", "573004445566", "ACK", secret="wrong")   # -> 403

Bodies have the shape of ``../shared/samples/cloud-webhooks.jsonl``.

The Cloud API test server records the id it answered each send with (`sent_ids()`),
the id statuses refer to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

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
