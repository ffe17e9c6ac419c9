"""`make demo`: the main job on embedded defaults, start to finish, in about ten seconds.

A private mosquitto, the reference backend, the bridge with the WhatsApp `log`
provider and memory queues; publish the five sample messages of the original
project, then show what the backend stored and what WhatsApp would have sent.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.backend import Backend  # noqa: E402
from tests.support.bridge import BridgeProc, Publisher, wait_until  # noqa: E402
from tests.support.procs import Mosquitto  # noqa: E402

SAMPLES = [
    {"tipo_mensaje": "semaforos", "tipo_alarma": "AZUL", "empresa": "cota"},
    {"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "descripcion": "Fallo en sistema"},
    {"tipo_mensaje": "estado", "status": "online", "timestamp": "2024-01-01T12:00:00"},
    {"tipo_mensaje": "configuracion", "parametros": {"intervalo": 30, "modo": "automatico"}},
    {"tipo_mensaje": "heartbeat", "timestamp": "2024-01-01T12:00:00"},
]


def main() -> int:
    broker = Mosquitto(persistence=False)
    backend = Backend(quiet=True)
    bridge: BridgeProc | None = None
    try:
        broker.start()
        backend.start()
        print(f"· mosquitto privado en 127.0.0.1:{broker.port}")
        print(f"· backend de referencia en {backend.url}")
        bridge = BridgeProc(
            mqtt_port=broker.port,
            backend_url=backend.url,
            redis_url="",  # memory queues
            conf={
                "mqtt": {"client_id": "botonera-bridge-demo"},
                "central": ["+573000000009"],
                "empresas": [{"id": "cota", "nombre": "Cota", "contactos": ["+573000000001"]}],
            },
        ).start()
        print(f"· botonera-bridge en marcha (estado: http://127.0.0.1:{bridge.status_port}/)")
        publisher = Publisher(broker.port)
        for msg in SAMPLES:
            publisher.publish(msg)
            print(f"  → publicado en 'empresas': {json.dumps(msg, ensure_ascii=False)}")
        publisher.close()
        wait_until(lambda: len(backend.alerts()) >= 4, 20, "4 alerts at the backend")
        time.sleep(1.5)  # let WhatsApp's 0.5 s gathering window pass
        print("\nEl backend guardó:")
        for a in backend.alerts():
            p = dict(a["payload"])
            meta = p.pop("_bridge")
            print(f"  #{a['id']} {a['tipo_mensaje']:<13} {json.dumps(p, ensure_ascii=False)}")
            flags = meta.get("flags", [])
            print(f"      _bridge: id={meta['id']} origen={meta['origen']} flags={flags}")
        print("\nWhatsApp habría enviado (proveedor 'log'):")
        for line in bridge.log_text().splitlines():
            m = re.search(r"WhatsApp → .*", line)
            if m:
                print(f"  {m.group(0)}")
        code = bridge.terminate()
        print(f"\nbotonera-bridge se detuvo con código {code}")
        return 0 if code == 0 and len(backend.alerts()) == 4 else 1
    finally:
        if bridge is not None:
            bridge.cleanup()
        backend.cleanup()
        broker.cleanup()


if __name__ == "__main__":
    sys.exit(main())
