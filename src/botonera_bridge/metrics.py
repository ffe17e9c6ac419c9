"""Prometheus metrics, on a registry owned by one app instance (no global registry)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from . import __version__

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
        self.intake_failures = Counter(
            "botonera_intake_failures",
            "Unexpected failures inside an intake task (router append, MQTT reader), "
            "recovered in place",
            ["task"],
            registry=r,
        )
        self.flagged = Counter(
            "botonera_flagged",
            "Events forwarded with a flag (odd metadata kept as is, missing fields)",
            ["flag"],
            registry=r,
        )
        self.heartbeats_unidentified = Counter(
            "botonera_heartbeats_unidentified",
            "Heartbeats without any identity (no empresa): counted, not watched",
            registry=r,
        )
        self.devices_capped = Counter(
            "botonera_devices_capped",
            "New panels not watched because heartbeat.max_devices was reached",
            registry=r,
        )
        self.devices_forgotten = Counter(
            "botonera_devices_forgotten",
            "Panels forgotten after heartbeat.forget_after of silence",
            registry=r,
        )
        self.whatsapp_sent = Counter(
            "botonera_whatsapp_sent", "WhatsApp messages sent", ["kind"], registry=r
        )
        self.config_reloads = Counter(
            "botonera_config_reloads",
            "SIGHUP config reloads (applied, refused: invalid file, failed: while applying)",
            ["result"],
            registry=r,
        )
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes…
        Info("botonera_build", "Version of the running bridge", registry=r).info(
            {"version": __version__, "python": sys.version.split()[0]}
        )
        self.open_alarms = Gauge(
            "botonera_open_alarms",
            "Unacknowledged alarms per empresa (unconfigured empresas share sin_configurar)",
            ["empresa_bucket"],
            registry=r,
        )
        self.escalations = Counter(
            "botonera_escalations", "Alarms re-sent because nobody acknowledged them", registry=r
        )
        self.memory_fallback_limit = Gauge(
            "botonera_memory_fallback_limit",
            "Events the memory fallback holds before MQTT acknowledgements stop",
            registry=r,
        )
        for result in ("applied", "refused", "failed"):
            self.config_reloads.labels(result=result)
        self.ha_sessions = Gauge(
            "botonera_ha_sessions",
            "MQTT sessions this replica holds (role: own, adopted)",
            ["role"],
            registry=r,
        )
        self.ha_takeovers = Counter(
            "botonera_ha_takeovers",
            "MQTT sessions of silent replicas adopted by this one",
            ["replica"],
            registry=r,
        )
        self.ha_handbacks = Counter(
            "botonera_ha_handbacks", "Adopted MQTT sessions given back", ["replica"], registry=r
        )
        self.ha_lease_lost = Counter(
            "botonera_ha_lease_lost",
            "Session leases this replica found held by another (fencing)",
            registry=r,
        )
        for role in ("own", "adopted"):
            self.ha_sessions.labels(role=role)
        for tipo in ("semaforos", "alarmas", "estado", "configuracion", "heartbeat"):
            self.received.labels(tipo=tipo)
        for sink in SINKS:
            self.delivered.labels(sink=sink)
            self.retries.labels(sink=sink)
        for state in ("online", "offline", "nunca_visto"):
            self.devices.labels(state=state)

    def render(self) -> bytes:
        # Without the *_created series: they double the sample count and tell operators
        # nothing a restart time does not. Filtered here, for this registry only, since
        # prometheus_client's own switch (disable_created_metrics) is process-global.
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A read-only view of a registry whose families omit ``*_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
