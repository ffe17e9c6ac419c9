"""botonera-bridge: MQTT panic-button panels to the alert backend and WhatsApp."""

# The one place the version is written (pyproject.toml reads it from here): a constant,
# because importlib.metadata costs 1.5 MB of idle RSS (email, zipfile, csv).
__version__ = "0.1.0"

USER_AGENT = f"botonera-bridge/{__version__}"
