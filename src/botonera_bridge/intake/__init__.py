"""MQTT intake: the broker client, the router into the outbox, session adoption (HA)."""
