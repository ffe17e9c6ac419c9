"""The command line: ``botonera-bridge run|check-config|send-test|…``."""
