"""Configuration: a TOML file, then environment variables, validated into frozen Structs.

Lookup order for the file: ``--config PATH``, ``$BOTONERA_CONFIG``,
``./botonera-bridge.toml`` if present, else built-in defaults. Unknown keys are
errors naming the key and the file. Secrets may come from ``*_file`` keys and are
masked by :func:`masked` wherever they are printed.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

from .errors import ConfigError
from .ids import is_e164

DEFAULT_FILE: Final = "botonera-bridge.toml"
BUILTIN_EMPRESAS: Final = (
    ("cota", "Cota"),
    ("tocancipa", "Tocancipá"),
    ("funza", "Funza"),
    ("madrid", "Madrid"),
)


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class MqttSettings(_Section, frozen=True):
    broker: str = "localhost"
    port: int = 1883
    username: str = ""
    password: str = ""
    password_file: str = ""
    topics: tuple[str, ...] = ("empresas",)
    client_id: str = "botonera-bridge"
    qos: int = 1
    tls: bool = False
    ca_file: str = ""
    keepalive: int = 30  # seconds
    max_payload: int = 65536  # bytes
    shared_group: str = ""


class BackendSettings(_Section, frozen=True):
    url: str = "http://localhost:8000"
    token: str = ""
    token_file: str = ""
    timeout: float = 10.0  # seconds, connect and read
    retry_max_delay: float = 30.0  # seconds
    verify: bool = False
    verify_ttl: float = 600.0  # seconds
    concurrency: int = 8  # empresas delivered in parallel


class RedisSettings(_Section, frozen=True):
    url: str = "redis://localhost:6379/0"
    prefix: str = "botonera"
    memory_limit: int = 10000  # events held in memory while Redis is away
    reclaim_idle: float = 60.0  # seconds before a silent consumer's entries are taken over
    timeout: float = 1.0  # seconds per command; past it Redis counts as down (memory fallback)
    ca_file: str = ""  # CA bundle for rediss:// (default: the system's)
    sentinels: tuple[str, ...] = ()  # "host:26379", ...: find the master through Sentinel
    sentinel_master: str = ""  # the master's name in Sentinel
    dead_max: int = 10000  # entries kept in the :dead stream (oldest trimmed, counted)


class WebsocketSettings(_Section, frozen=True):
    url: str = "ws://localhost:8080/ws"
    reconnect_delay: float = 3.0  # seconds


class WhatsappSettings(_Section, frozen=True):
    provider: str = "log"
    api_url: str = ""
    api_version: str = "v21.0"
    phone_number_id: str = ""
    token: str = ""
    token_file: str = ""
    session: str = "default"
    template: str = ""
    language: str = "es"
    max_per_second: float = 20.0
    min_interval: float = 6.0  # seconds between two messages to one number
    dedup_window: float = 60.0  # seconds
    timeout: float = 10.0  # seconds
    app_secret: str = ""  # Cloud API webhook signatures (X-Hub-Signature-256)
    app_secret_file: str = ""
    verify_token: str = ""  # Cloud API webhook verification (hub.verify_token)


class HeartbeatSettings(_Section, frozen=True):
    timeout: float = 90.0  # seconds of silence before a panel is offline
    stall_timeout: float = 60.0  # seconds a sink may sit on pending work
    max_devices: int = 10000  # panels watched at most; more is a WARNING and a metric
    forget_after: float = 604800.0  # seconds of silence before a panel is forgotten (7 days)


class EscalationSettings(_Section, frozen=True):
    after: float = 300.0  # seconds
    max: int = 3
    unread_after: float = 120.0  # seconds; unread by every contact -> central at once


class StatusSettings(_Section, frozen=True):
    listen: str = "127.0.0.1:9108"
    token: str = ""
    token_file: str = ""


class HaSettings(_Section, frozen=True):
    enabled: bool = False  # session adoption between replicas (needs redis.url)
    lease: float = 10.0  # seconds a silent replica keeps its MQTT session before adoption


class LogSettings(_Section, frozen=True):
    level: str = "INFO"
    format: str = "text"


class Empresa(_Section, frozen=True):
    id: str
    nombre: str = ""
    contactos: tuple[str, ...] = ()
    paneles: tuple[str, ...] = ()  # "sede/dispositivo" ("-" for none): watched from the start

    @property
    def label(self) -> str:
        return self.nombre or self.id.capitalize()


class Settings(_Section, frozen=True):
    mqtt: MqttSettings = MqttSettings()
    backend: BackendSettings = BackendSettings()
    redis: RedisSettings = RedisSettings()
    websocket: WebsocketSettings = WebsocketSettings()
    whatsapp: WhatsappSettings = WhatsappSettings()
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    escalation: EscalationSettings = EscalationSettings()
    status: StatusSettings = StatusSettings()
    ha: HaSettings = HaSettings()
    log: LogSettings = LogSettings()
    central: tuple[str, ...] = ()
    empresas: tuple[Empresa, ...] = ()
    shutdown_grace: float = 10.0  # seconds to drain on SIGTERM
    source: str = "defaults"

    def empresa(self, empresa_id: str) -> Empresa | None:
        for e in self.empresas:
            if e.id == empresa_id:
                return e
        return None


# env var -> (section, key, parser)
_ENV: Final[dict[str, tuple[str, str, str]]] = {
    "MQTT_BROKER": ("mqtt", "broker", "str"),
    "MQTT_PORT": ("mqtt", "port", "int"),
    "MQTT_USERNAME": ("mqtt", "username", "str"),
    "MQTT_PASSWORD": ("mqtt", "password", "str"),
    "MQTT_TOPICS": ("mqtt", "topics", "list"),
    "MQTT_CLIENT_ID": ("mqtt", "client_id", "str"),
    "MQTT_SHARED_GROUP": ("mqtt", "shared_group", "str"),
    "BACKEND_URL": ("backend", "url", "str"),
    "BACKEND_TOKEN": ("backend", "token", "str"),
    "REDIS_URL": ("redis", "url", "str"),
    "WEBSOCKET_URL": ("websocket", "url", "str"),
    "WHATSAPP_PROVIDER": ("whatsapp", "provider", "str"),
    "WHATSAPP_API_URL": ("whatsapp", "api_url", "str"),
    "WHATSAPP_TOKEN": ("whatsapp", "token", "str"),
    "WHATSAPP_PHONE_NUMBER_ID": ("whatsapp", "phone_number_id", "str"),
    "WHATSAPP_APP_SECRET": ("whatsapp", "app_secret", "str"),
    "WHATSAPP_VERIFY_TOKEN": ("whatsapp", "verify_token", "str"),
    "HEARTBEAT_TIMEOUT": ("heartbeat", "timeout", "float"),
    "STATUS_LISTEN": ("status", "listen", "str"),
    "STATUS_TOKEN": ("status", "token", "str"),
    "HA_ENABLED": ("ha", "enabled", "bool"),
    "HA_LEASE": ("ha", "lease", "float"),
    "LOG_LEVEL": ("log", "level", "str"),
    "LOG_FORMAT": ("log", "format", "str"),
}

SECRET_KEYS: Final = frozenset({"password", "token", "app_secret", "verify_token"})
# systemd LoadCredential= names -> (section, key): read from $CREDENTIALS_DIRECTORY/<name>
# when the key is still empty after the file, its *_file key and the environment.
CREDENTIALS: Final[dict[str, tuple[str, str]]] = {
    "mqtt_password": ("mqtt", "password"),
    "backend_token": ("backend", "token"),
    "whatsapp_token": ("whatsapp", "token"),
    "whatsapp_app_secret": ("whatsapp", "app_secret"),
    "whatsapp_verify_token": ("whatsapp", "verify_token"),
    "status_token": ("status", "token"),
}


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get("BOTONERA_CONFIG"):
        return Path(env["BOTONERA_CONFIG"])
    default = Path(DEFAULT_FILE)
    return default if default.is_file() else None


def load(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read, merge and validate the configuration. Raises ConfigError."""
    env = os.environ if env is None else env
    path = find_config_file(explicit, env)
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError("config file not found", source=source) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file: {exc}", source=source) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", source=source) from exc
    if "source" in raw:  # an internal field, never a key of the file
        raise ConfigError("unknown key 'source'", source=source, key="source")
    return from_mapping(raw, env=env, source=source)


def from_mapping(
    raw: dict[str, Any], *, env: Mapping[str, str] | None = None, source: str = "defaults"
) -> Settings:
    env = {} if env is None else env
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for var, (section, key, kind) in _ENV.items():
        value = env.get(var)
        if value is None or value == "" and kind != "str":
            continue
        sect = data.setdefault(section, {})
        if not isinstance(sect, dict):
            raise ConfigError(f"'{section}' must be a table", source=source, key=section)
        try:
            sect[key] = _parse_env(value, kind)
        except ValueError as exc:
            raise ConfigError(f"{var}={value!r} is not a valid {kind}", source="env") from exc
        if var == "MQTT_BROKER" and ":" in value and "MQTT_PORT" not in env:
            host, _, port = value.rpartition(":")
            if port.isdigit():
                sect["broker"], sect["port"] = host, int(port)
    try:
        settings = msgspec.convert(data | {"source": source}, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise _translate(exc, source) from exc
    return _finish(_credentials(settings, env, source), source)


def _credentials(s: Settings, env: Mapping[str, str], source: str) -> Settings:
    """Fill empty secrets from systemd's ``LoadCredential=`` files, if any."""
    directory = env.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        return s
    for name, (section, key) in CREDENTIALS.items():
        sect = getattr(s, section)
        if key not in sect.__struct_fields__ or getattr(sect, key):
            continue
        path = Path(directory) / name
        if path.is_file():
            value = _read_secret(str(path), source, f"credential {name}")
            sect = msgspec.structs.replace(sect, **{key: value})
            s = msgspec.structs.replace(s, **{section: sect})
    return s


def _parse_env(value: str, kind: str) -> Any:
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "list":
        return [v.strip() for v in value.split(",") if v.strip()]
    if kind == "bool":
        if value.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(value)
        return value.strip().lower() in ("1", "true", "yes", "on")
    return value


def _translate(exc: msgspec.ValidationError, source: str) -> ConfigError:
    msg = str(exc)
    m = re.match(r"Object contains unknown field `([^`]+)`(?: - at `\$\.?(.*)`)?", msg)
    if m:
        key = ".".join(p for p in (_dotted(m.group(2) or ""), m.group(1)) if p)
        return ConfigError(f"unknown key '{key}'", source=source, key=key)
    m = re.match(r"(.*) - at `\$\.?(.*)`", msg)
    if m:
        key = _dotted(m.group(2))
        return ConfigError(f"invalid value for '{key}': {m.group(1)}", source=source, key=key)
    return ConfigError(msg, source=source)


def _dotted(path: str) -> str:
    return re.sub(r"\[(\d+)\]", r"[\1]", path)


def _read_secret(path: str, source: str, key: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {key} {path!r}: {exc.strerror}", source=source) from exc


def _finish(s: Settings, source: str) -> Settings:
    mqtt, backend, wa = s.mqtt, s.backend, s.whatsapp
    if mqtt.password_file and not mqtt.password:
        pw = _read_secret(mqtt.password_file, source, "mqtt.password_file")
        mqtt = msgspec.structs.replace(mqtt, password=pw)
    if backend.token_file and not backend.token:
        tok = _read_secret(backend.token_file, source, "backend.token_file")
        backend = msgspec.structs.replace(backend, token=tok)
    if wa.token_file and not wa.token:
        wa = msgspec.structs.replace(
            wa, token=_read_secret(wa.token_file, source, "whatsapp.token_file")
        )
    if wa.app_secret_file and not wa.app_secret:
        wa = msgspec.structs.replace(
            wa, app_secret=_read_secret(wa.app_secret_file, source, "whatsapp.app_secret_file")
        )
    status = s.status
    if status.token_file and not status.token:
        tok = _read_secret(status.token_file, source, "status.token_file")
        status = msgspec.structs.replace(status, token=tok)
    if mqtt.qos not in (0, 1, 2):
        raise ConfigError("mqtt.qos must be 0, 1 or 2", source=source, key="mqtt.qos")
    if not mqtt.topics:
        raise ConfigError("mqtt.topics must not be empty", source=source, key="mqtt.topics")
    if wa.provider not in ("log", "cloud", "waha"):
        raise ConfigError(
            f"whatsapp.provider must be log, cloud or waha, not {wa.provider!r}",
            source=source,
            key="whatsapp.provider",
        )
    if wa.provider != "log" and not wa.api_url:
        raise ConfigError(
            f"whatsapp.api_url is required for provider {wa.provider}",
            source=source,
            key="whatsapp.api_url",
        )
    _check_redis(s.redis, source)
    if s.log.format not in ("text", "json"):
        raise ConfigError("log.format must be text or json", source=source, key="log.format")
    if s.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"unknown log.level {s.log.level!r}", source=source, key="log.level")
    _check_values(s, source)
    if s.ha.enabled and not s.redis.url:
        raise ConfigError(
            "ha.enabled needs redis.url: the replicas' leases live in Redis",
            source=source,
            key="ha.enabled",
        )
    if not 1.0 <= s.ha.lease <= 300.0:
        raise ConfigError(
            "ha.lease must be between 1 and 300 seconds", source=source, key="ha.lease"
        )
    if s.heartbeat.max_devices < 1:
        raise ConfigError(
            "heartbeat.max_devices must be at least 1", source=source, key="heartbeat.max_devices"
        )
    if not s.heartbeat.forget_after > s.heartbeat.timeout:
        raise ConfigError(
            "heartbeat.forget_after must be longer than heartbeat.timeout",
            source=source,
            key="heartbeat.forget_after",
        )
    if s.status.listen and not re.match(r"^.+:\d+$", s.status.listen):
        raise ConfigError("status.listen must be host:port", source=source, key="status.listen")
    from .ids import IdentifierError, normalize_id  # local: ids imports nothing from here

    empresas: dict[str, Empresa] = {eid: Empresa(id=eid, nombre=n) for eid, n in BUILTIN_EMPRESAS}
    for i, e in enumerate(s.empresas):
        try:
            eid = normalize_id(e.id)
        except IdentifierError as exc:
            raise ConfigError(str(exc), source=source, key=f"empresas[{i}].id") from exc
        for c in e.contactos:
            _check_phone(c, source, f"empresas[{i}].contactos")
        builtin = empresas.get(eid)
        nombre = e.nombre or (builtin.nombre if builtin else "")
        paneles = tuple(_panel(p, source, f"empresas[{i}].paneles") for p in e.paneles)
        empresas[eid] = Empresa(id=eid, nombre=nombre, contactos=e.contactos, paneles=paneles)
    for c in s.central:
        _check_phone(c, source, "central")
    return msgspec.structs.replace(
        s,
        mqtt=mqtt,
        backend=backend,
        whatsapp=wa,
        status=status,
        empresas=tuple(empresas.values()),
        log=msgspec.structs.replace(s.log, level=s.log.level.upper()),
    )


# URL keys -> the schemes that can work; an empty value disables where that is allowed
_URL_SCHEMES: Final = (
    ("websocket", "url", ("ws", "wss"), True),
    ("redis", "url", ("redis", "rediss", "unix"), True),
    ("backend", "url", ("http", "https"), False),
    ("whatsapp", "api_url", ("http", "https"), True),
)
# duration/number keys that must be > 0 (strictly) or >= 0
_POSITIVE: Final = (
    "mqtt.keepalive", "mqtt.max_payload", "backend.timeout", "backend.retry_max_delay",
    "backend.concurrency", "redis.memory_limit", "redis.reclaim_idle",
    "websocket.reconnect_delay", "whatsapp.max_per_second", "whatsapp.timeout",
    "heartbeat.timeout", "heartbeat.stall_timeout", "escalation.after",
)  # fmt: skip
_NON_NEGATIVE: Final = (
    "backend.verify_ttl", "whatsapp.min_interval", "whatsapp.dedup_window",
    "escalation.max", "shutdown_grace",
)  # fmt: skip


def _check_values(s: Settings, source: str) -> None:
    """Values that parse but cannot work fail here, at load (exit 2), naming the key,
    rather than as a traceback once the bridge runs."""
    for section, key, schemes, may_be_empty in _URL_SCHEMES:
        value = getattr(getattr(s, section), key)
        if not value and may_be_empty:
            continue
        scheme = value.partition("://")[0].lower() if "://" in value else ""
        if scheme not in schemes:
            allowed = " or ".join(f"{x}://" for x in schemes)
            raise ConfigError(
                f"{section}.{key} must start with {allowed}"
                + (" (or be empty to disable it)" if may_be_empty else "")
                + f", not {value.split('://')[0] + '://' if scheme else repr(value[:40])}",
                source=source,
                key=f"{section}.{key}",
            )
    if not 0 < s.mqtt.port < 65536:
        raise ConfigError("mqtt.port must be 1-65535", source=source, key="mqtt.port")
    for dotted, strict in [(k, True) for k in _POSITIVE] + [(k, False) for k in _NON_NEGATIVE]:
        node: Any = s
        for part in dotted.split("."):
            node = getattr(node, part)
        if node != node or (node <= 0 if strict else node < 0):  # NaN is never valid
            raise ConfigError(
                f"{dotted} must be {'> 0' if strict else '>= 0'}, not {node!r}",
                source=source,
                key=dotted,
            )


def _panel(value: str, source: str, key: str) -> str:
    """``"Sede Norte/p1"`` -> ``"sede_norte/p1"``; ``"-"`` stands for a missing part."""
    from .ids import IdentifierError, normalize_id

    sede, slash, dispositivo = value.partition("/")
    if not slash or "/" in dispositivo:
        raise ConfigError(f"{value!r} is not 'sede/dispositivo'", source=source, key=key)
    try:
        parts = [p if p.strip() == "-" else normalize_id(p, "panel") for p in (sede, dispositivo)]
    except IdentifierError as exc:
        raise ConfigError(str(exc), source=source, key=key) from exc
    return "/".join(p.strip() for p in parts)


def _check_redis(r: RedisSettings, source: str) -> None:
    # the URL scheme is checked with the other URLs in _check_values
    if r.timeout <= 0:
        raise ConfigError("redis.timeout must be > 0 seconds", source=source, key="redis.timeout")
    if r.dead_max < 1:
        raise ConfigError("redis.dead_max must be >= 1", source=source, key="redis.dead_max")
    if r.sentinels and not r.sentinel_master:
        raise ConfigError(
            "redis.sentinels needs redis.sentinel_master",
            source=source,
            key="redis.sentinel_master",
        )


def _check_phone(number: str, source: str, key: str) -> None:
    if not is_e164(number):
        raise ConfigError(f"{number!r} is not an E.164 number (+57...)", source=source, key=key)


def mask(secret: str) -> str:
    return "" if not secret else "****"


def _masked_value(key: str, value: Any, walk: Any) -> Any:
    from .redact import mask_url  # local: keeps config's imports minimal

    if isinstance(value, str):
        if key in SECRET_KEYS:
            return mask(value)
        return mask_url(value) if "://" in value else value  # a secret inside a URL
    return walk(value)


def masked(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data, every secret replaced by ****."""
    data: dict[str, Any] = msgspec.to_builtins(settings)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: _masked_value(k, v, walk) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(data)
    return out


# Reload (SIGHUP): what a running bridge can take at once, and what needs a restart.
# Sections/keys opened once at start (connections, listeners, pools, the log handler)
# keep their running value when a reload changes them; the rest applies at once.
RESTART_SECTIONS: Final = ("mqtt", "backend", "redis", "websocket", "heartbeat", "status")
LIVE_WHATSAPP_KEYS: Final = frozenset({"template", "language"})


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """Dotted keys whose new value only a restart can apply."""
    out = []
    for section in RESTART_SECTIONS:
        a = msgspec.to_builtins(getattr(old, section))
        b = msgspec.to_builtins(getattr(new, section))
        out += [f"{section}.{k}" for k in a if a[k] != b.get(k)]
    a, b = msgspec.to_builtins(old.whatsapp), msgspec.to_builtins(new.whatsapp)
    out += [f"whatsapp.{k}" for k in a if a[k] != b.get(k) and k not in LIVE_WHATSAPP_KEYS]
    if old.log.format != new.log.format:
        out.append("log.format")
    return out


def merge_reload(old: Settings, new: Settings) -> Settings:
    """``new`` with every restart-only value kept at ``old``'s."""
    wa = msgspec.structs.replace(
        old.whatsapp, **{k: getattr(new.whatsapp, k) for k in LIVE_WHATSAPP_KEYS}
    )
    kept = {section: getattr(old, section) for section in RESTART_SECTIONS}
    log_settings = msgspec.structs.replace(new.log, format=old.log.format)
    return msgspec.structs.replace(new, whatsapp=wa, log=log_settings, **kept)


class Live:
    """The running configuration: read ``current`` at use time. :meth:`swap` replaces it
    whole (Settings are frozen, so a reader never sees half a reload) and tells every
    subscriber, in the order they subscribed."""

    def __init__(self, settings: Settings) -> None:
        self._current = settings
        self._subscribers: list[Callable[[Settings], None]] = []

    @property
    def current(self) -> Settings:
        return self._current

    def subscribe(self, fn: Callable[[Settings], None]) -> None:
        self._subscribers.append(fn)

    def swap(self, new: Settings) -> None:
        self._current = new
        for fn in self._subscribers:
            fn(new)
