"""Per-number WhatsApp digests through the real bridge process (issue 10's must-shows 1, 2,
3's mass offline, 6), against the Cloud API test server enforcing Meta's pair rate."""

from __future__ import annotations

import json
import time

import pytest
from tests.servers.whatsapp_api import FakeWhatsApp
from tests.support.bridge import wait_until

ANA = "+573001112233"
BETO = "+573004445566"
PAIR_RATE = 5.5  # seconds: a second message to one number sooner answers 131056


@pytest.fixture
def wa():
    server = FakeWhatsApp(pair_rate=PAIR_RATE)
    yield server
    server.close()


@pytest.fixture
def cloud_bridge(bridge_factory, wa):
    def make(redis_url: str = "", **conf):
        base = {
            "whatsapp": {
                "provider": "cloud",
                "api_url": wa.url,
                "phone_number_id": "1055",
                "token": "wa-tok",
                **conf.pop("whatsapp", {}),
            },
            "empresas": [{"id": "cota", "nombre": "Cota", "contactos": [ANA, BETO]}],
            **conf,
        }
        return bridge_factory(conf=base, redis_url=redis_url).start()

    return make


def accepted(wa: FakeWhatsApp, number: str) -> list[tuple[float, str]]:
    """(arrival, text or template parameters) of every message the API accepted for number."""
    out = []
    for r in wa.requests():
        body = r.json if isinstance(r.json, dict) else {}
        if r.status >= 300 or body.get("to") != number.lstrip("+"):
            continue
        if "text" in body:
            out.append((r.at, body["text"]["body"]))
        else:
            params = body["template"]["components"][0]["parameters"]
            out.append((r.at, "\n".join(p["text"] for p in params)))
    return out


def alarma(desc: str, sede: str, **kw) -> dict:
    return {
        "tipo_mensaje": "alarmas",
        "tipo_alarma": "CRITICA",
        "descripcion": desc,
        "empresa": "cota",
        "sede": sede,
        **kw,
    }


def test_incident_burst_reaches_every_contact_in_digests(
    cloud_bridge, wa, publisher, backend, redis_server
):
    """10.1: 6 alarmas (6 sedes) in 0.3 s, then 4 more 1 s apart, two contacts."""
    cloud_bridge(redis_url=redis_server.url)
    published: dict[str, float] = {}
    for i in range(6):
        desc = f"Incendio en sede {i}"
        published[desc] = time.monotonic()
        publisher.publish(alarma(desc, f"s{i}"))
        time.sleep(0.06)
    for i in range(6, 10):
        time.sleep(1.0)
        desc = f"Robo en sede {i}"
        published[desc] = time.monotonic()
        publisher.publish(alarma(desc, f"s{i}"))
    first_publish = min(published.values())

    def told(number: str) -> dict[str, float]:
        return {
            desc: min(at for at, text in accepted(wa, number) if desc in text)
            for desc in published
            if any(desc in text for _, text in accepted(wa, number))
        }

    for number in (ANA, BETO):
        wait_until(lambda n=number: len(told(n)) == 10, 15, f"all 10 told to {number[:4]}…")
    time.sleep(1.0)  # nothing else follows
    for number in (ANA, BETO):
        when = told(number)
        for desc in list(published)[:6]:
            assert when[desc] - first_publish <= 2.0, (desc, when[desc] - first_publish)
        for desc in list(published)[6:]:
            assert when[desc] - published[desc] <= 8.0, (desc, when[desc] - published[desc])
        assert len(accepted(wa, number)) <= 3, accepted(wa, number)
        first6 = max(when[d] for d in list(published)[:6]) - first_publish
        later = max(when[d] - published[d] for d in list(published)[6:])
        who = "Ana" if number == ANA else "Beto"
        print(
            f"10.1 {who}: first 6 told within {first6:.2f} s, later ones within "
            f"{later:.2f} s, {len(accepted(wa, number))} messages"
        )
    assert wa.answered(131056) == 0
    alerts = wait_until(
        lambda: a if len(a := [x for x in backend.alerts() if x["tipo_mensaje"] == "alarmas"]) >= 10
        else None,
        5,
        "10 alarms at the backend",
    )  # fmt: skip
    assert sorted(a["payload"]["descripcion"] for a in alerts) == sorted(published)


def test_status_storm_never_delays_an_alarm(cloud_bridge, wa, publisher, redis_server):
    """10.2: 20 estado offline from panel p1 within 2 s, then a CRITICA from p2.

    With the Redis outbox (production): a panel's message is safe, so acknowledged to
    the broker, once appended. (Memory-only, unacknowledged WhatsApp notices hold
    mosquitto's in-flight window of 20, and the 21st message waits at the broker.)
    """
    cloud_bridge(redis_url=redis_server.url)
    for _ in range(20):
        publisher.publish(
            {
                "tipo_mensaje": "estado",
                "status": "offline",
                "empresa": "cota",
                "sede": "norte",
                "dispositivo": "p1",
            }
        )
        time.sleep(0.1)
    t0 = time.monotonic()
    publisher.publish(alarma("Asalto en portería", "sur", dispositivo="p2"))
    at, text = wait_until(
        lambda: next(((a, t) for a, t in accepted(wa, ANA) if "Asalto en portería" in t), None),
        8,
        "the alarm at Ana",
    )
    assert at - t0 <= 7.0, (at - t0, [(a - t0, t) for a, t in accepted(wa, ANA)])
    print(f"10.2: the alarm reached Ana {at - t0:.2f} s after its publish")
    assert wa.answered(131056) == 0
    storm = [t for _, t in accepted(wa, ANA) if "PANEL SIN CONEXIÓN" in t]
    assert len(storm) <= 2  # counted, not repeated: never 20 messages
    assert any("×" in t for t in storm)


def test_twelve_panels_stopping_together_make_one_summary_per_contact(
    cloud_bridge, wa, publisher, backend
):
    """10.3: 12 heartbeating panels of cota stop together: 12 backend events, one
    WhatsApp summary per contact."""
    cloud_bridge(heartbeat={"timeout": 2.0})
    panels = [f"hb{i:02d}" for i in range(12)]
    for _ in range(4):
        for p in panels:
            publisher.publish(
                {"tipo_mensaje": "heartbeat", "empresa": "cota", "sede": "bodega", "dispositivo": p}
            )
        time.sleep(0.4)

    def offline_events() -> list[dict]:
        return [
            a["payload"]
            for a in backend.alerts()
            if a["payload"].get("_bridge", {}).get("origen") == "watchdog"
            and a["payload"].get("status") == "offline"
        ]

    events = wait_until(lambda: e if len(e := offline_events()) >= 12 else None, 10, "12 offline")
    assert sorted(e["dispositivo"] for e in events) == panels
    for number in (ANA, BETO):
        wait_until(
            lambda n=number: [t for _, t in accepted(wa, n) if "paneles sin conexión" in t],
            15,
            f"summary to {number[:4]}…",
        )
    time.sleep(1.0)
    for number in (ANA, BETO):
        texts = [t for _, t in accepted(wa, number)]
        assert len(texts) == 1, texts
        assert texts[0].startswith("📴 12 paneles sin conexión — Cota: bodega/hb00, ")
    assert len(offline_events()) == 12


def huge_alarm(sede: str) -> dict:
    """An alarma whose descripcion fills the 64 KiB payload limit, with newlines and tabs."""
    payload = alarma(("Incendio en la bodega\ncon\tvarias   lineas " * 2000), sede)
    excess = len(json.dumps(payload)) - 65536
    payload["descripcion"] = payload["descripcion"][: -excess - 1]
    assert len(json.dumps(payload)) <= 65536
    assert len(payload["descripcion"]) > 60_000
    return payload


@pytest.mark.parametrize("template", ["", "alerta_botonera"])
def test_64_kib_description_fits_whatsapp_limits(cloud_bridge, wa, publisher, template):
    """10.6: the text sent is ≤ 4,096 characters; with a template every parameter is one
    line ≤ 1,024."""
    cloud_bridge(whatsapp={"template": template})
    publisher.publish(huge_alarm("norte"))
    req, *_ = wait_until(lambda: [r for r in wa.requests() if r.status < 300], 5, "sent")
    body = req.json
    if not template:
        text = body["text"]["body"]
        assert len(text) <= 4096
        assert text.startswith("🚨 ALARMA CRITICA — Cota (sede norte): Incendio en la bodega")
        assert text.endswith("…")
        return
    params = [p["text"] for p in body["template"]["components"][0]["parameters"]]
    assert params[:2] == ["Cota (sede norte)", "ALARMA CRITICA"]
    for p in params:
        assert len(p) <= 1024
        assert "\n" not in p
        assert "\t" not in p
        assert "    " not in p
    assert params[2].startswith("Incendio en la bodega con varias lineas ")
    assert params[2].endswith("…")
