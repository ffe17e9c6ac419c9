"""Secrets from systemd's LoadCredential= ($CREDENTIALS_DIRECTORY/<name>)."""

from __future__ import annotations

from pathlib import Path

from botonera_bridge import config


def test_credentials_fill_empty_secrets_only(tmp_path: Path) -> None:
    (tmp_path / "mqtt_password").write_text("s3cret-mqtt\n")
    (tmp_path / "backend_token").write_text("tok-from-credential")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "BACKEND_TOKEN": "tok-from-env"}
    s = config.from_mapping({}, env=env)
    assert s.mqtt.password == "s3cret-mqtt"  # noqa: S105 - a test value
    assert s.backend.token == "tok-from-env"  # noqa: S105 - an explicit value wins
    assert s.whatsapp.token == ""  # no such credential file: nothing invented
    assert "s3cret" not in str(config.masked(s))


def test_no_credentials_directory_changes_nothing() -> None:
    assert config.from_mapping({}, env={}).mqtt.password == ""
