"""Prometheus metrics, on a registry owned by one app instance (no global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SINKS = ("backend", "whatsapp")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter(
            "botonera_messages_received", "MQTT messages received", ["tipo"], registry=r
        )
        self.delivered = Counter(
            "botonera_delivered", "Events delivered by a sink", ["sink"], registry=r
        )
        self.retries = Counter("botonera_retries", "Delivery retries", ["sink"], registry=r)
        self.dead_letters = Counter(
            "botonera_dead_letters", "Dead-lettered items", ["reason"], registry=r
        )
        self.dead_letters_memory_bytes = Gauge(
            "botonera_dead_letters_memory_bytes",
            "Bytes of dead letters held in memory (Redis away or refusing; at most 16 MiB)",
            registry=r,
        )
        self.dead_letters_trimmed = Counter(
            "botonera_dead_letters_trimmed",
            "Dead letters dropped, oldest first, by their bound (redis.dead_max, memory cap)",
            ["where"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "botonera_queue_depth", "Items waiting in a queue", ["queue"], registry=r
        )
        self.devices = Gauge("botonera_devices", "Panels by state", ["state"], registry=r)
        self.mqtt_connected = Gauge(
            "botonera_mqtt_connected", "1 while subscribed to the broker", registry=r
        )
        self.redis_connected = Gauge(
            "botonera_redis_connected", "1 while Redis is in use, 0 on memory fallback", registry=r
        )
        self.memory_fallback = Gauge(
            "botonera_memory_fallback", "1 while queues run on the memory fallback", registry=r
        )
        self.delivery_seconds = Histogram(
            "botonera_delivery_seconds",
            "Seconds from MQTT receipt to sink acceptance",
            ["sink"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.ignored = Counter(
            "botonera_whatsapp_ignored", "Inbound WhatsApp messages ignored", ["reason"], registry=r
        )
        self.invalid_frames = Counter(
            "botonera_ws_invalid_frames", "Malformed WebSocket frames", registry=r
        )
        self.rejected = Counter(
            "botonera_rejected",
            "Inputs rejected at an intake boundary (source: mqtt, websocket, webhook, inbox)",
            ["source", "reason"],
            registry=r,
        )
        self.whatsapp_sent = Counter(
            "botonera_whatsapp_sent", "WhatsApp messages sent", ["kind"], registry=r
        )
        for tipo in ("semaforos", "alarmas", "estado", "configuracion", "heartbeat"):
            self.received.labels(tipo=tipo)
        for sink in SINKS:
            self.delivered.labels(sink=sink)
            self.retries.labels(sink=sink)
        for state in ("online", "offline"):
            self.devices.labels(state=state)

    def render(self) -> bytes:
        return generate_latest(self.registry)
