import time
from .conftest import PacedPublisher, alarms, metrics, wait_all_seqs, backend_seqs
from tests.support.bridge import wait_until

def test_probe(bridge_factory, backend, publisher, redis_server):
    backend.fault(delay=0.02)
    bridge = bridge_factory().start()
    pub = PacedPublisher(publisher, alarms(1000), rate=300)
    pub.start()
    wait_until(lambda: pub.published >= 300, 30, "30%")
    redis_server.kill()
    t = time.monotonic()
    while time.monotonic() - t < 5:
        m = metrics(bridge)
        print(round(time.monotonic() - t, 1), "fallback", m.get("botonera_memory_fallback"), "mem", m.get('botonera_queue_depth{queue="memory"}'), "recv", m.get('botonera_messages_received_total{tipo="alarmas"}'), "pub", pub.published, "backend", len(backend.alerts()))
        time.sleep(0.3)
    bridge.kill()
    redis_server.start()
    bridge.start()
    pub.finish(30)
    try:
        wait_all_seqs(backend, set(range(1000)), timeout=30)
        print("ALL DELIVERED")
    except AssertionError as e:
        print("LOST:", e)
