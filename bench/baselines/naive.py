"""The hand-written forwarder a careful person writes: the benchmark's Python baseline.

paho ``loop_forever``, a persistent session (clean_session=False, fixed client id)
at QoS 1, and a keep-alive ``requests.Session().post`` inside ``on_message``. paho
sends the PUBACK after ``on_message`` returns, so a message is acknowledged once it
was POSTed (no outbox, no retry, no per-empresa lanes, one message at a time).

    python bench/baselines/naive.py --broker 127.0.0.1 --port 1883 --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import signal
import sys

import paho.mqtt.client as mqtt
import requests
from paho.mqtt.enums import CallbackAPIVersion


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--broker", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--topic", default="empresas")
    p.add_argument("--client-id", default="naive-forwarder")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    args = p.parse_args()
    endpoint = args.url.rstrip("/") + "/api/mqtt-alerts/process"
    session = requests.Session()  # keep-alive: one TCP connection for every POST
    headers = {"Content-Type": "application/json"}

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(args.topic, qos=1)
        print("connected", flush=True)

    def on_message(client, userdata, msg):
        try:
            session.post(endpoint, data=msg.payload, headers=headers, timeout=10)
        except requests.RequestException as exc:
            print(f"POST failed: {exc}", file=sys.stderr, flush=True)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False)
    client.on_connect = on_connect
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.connect(args.broker, args.port, keepalive=30)
    client.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
