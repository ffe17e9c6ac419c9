"""Durable queues: Redis streams with a bounded in-memory fallback."""
