"""The status server (``/healthz``, ``/readyz``, ``/metrics``, ``/api/status``) and its page."""

from .server import StatusApp, serve_status

__all__ = ["StatusApp", "serve_status"]
