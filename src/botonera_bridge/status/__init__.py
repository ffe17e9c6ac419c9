"""The status server (``/healthz``, ``/readyz``, ``/metrics``, ``/api/status``),
its page and model, and systemd notification."""
