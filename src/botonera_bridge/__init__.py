"""botonera-bridge: MQTT panic-button panels to the alert backend and WhatsApp."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("botonera-bridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

USER_AGENT = f"botonera-bridge/{__version__}"
