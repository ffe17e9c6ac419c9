"""The command line (typer). Exit codes: 0 ok, 1 failed check/operation, 2 usage or
config error, 130 interrupted."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, TypeVar

import typer

from . import USER_AGENT, __version__
from . import config as config_mod
from . import log as log_mod
from .config import Settings
from .errors import BridgeError, ConfigError, MqttError, RedisError
from .ids import IdentifierError, normalize_id

EXIT_OK: Final = 0
EXIT_FAIL: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
T = TypeVar("T")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="botonera-bridge: MQTT panic-button panels to the alert backend and WhatsApp.",
)
dead_app = typer.Typer(no_args_is_help=True, help="Inspect and replay dead letters.")
alerts_app = typer.Typer(no_args_is_help=True, help="Query the backend's stored alerts.")
app.add_typer(dead_app, name="dead-letters")
app.add_typer(alerts_app, name="alerts")

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config", "-c", help="TOML file (else $BOTONERA_CONFIG, else ./botonera-bridge.toml)"
    ),
]
log = logging.getLogger("botonera_bridge.cli")


def _load(config: str | None) -> Settings:
    try:
        return config_mod.load(config)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc


def _trio_run(fn: Callable[[], Awaitable[T]]) -> T:
    import trio  # imported late: keeps `--help` and `version` fast

    try:
        return trio.run(fn)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command()
def run(
    config: ConfigOpt = None,
    mqtt: Annotated[bool, typer.Option("--mqtt/--no-mqtt", help="read panels from MQTT")] = True,
    websocket: Annotated[
        bool, typer.Option("--websocket/--no-websocket", help="read WhatsApp replies")
    ] = True,
) -> None:
    """Run the bridge (the daemon)."""
    settings = _load(config)
    log_mod.setup(settings.log.level, settings.log.format)
    import trio

    from .app import run as app_run

    try:
        code = trio.run(lambda: app_run(settings, mqtt_enabled=mqtt, ws_enabled=websocket))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except ConfigError as exc:
        log.critical("fatal configuration error: %s", exc)
        raise typer.Exit(EXIT_USAGE) from exc
    raise typer.Exit(code)


@app.command("check-config")
def check_config(
    config: ConfigOpt = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="only validate, contact nothing")
    ] = False,
) -> None:
    """Validate and print the effective config (secrets masked); then try every server."""
    settings = _load(config)
    typer.echo(f"# configuración efectiva ({settings.source})")
    typer.echo(json.dumps(config_mod.masked(settings), indent=2, ensure_ascii=False))
    if offline:
        typer.echo("✓ configuración válida")
        raise typer.Exit(EXIT_OK)
    from .checks import run_checks

    results = _trio_run(lambda: run_checks(settings))
    for ok, name, detail in results:
        typer.echo(f"{'✓' if ok else '✗'} {name}: {detail}")
    raise typer.Exit(EXIT_OK if all(ok for ok, _, _ in results) else EXIT_FAIL)


@app.command("send-test")
def send_test(
    empresa: Annotated[str, typer.Option(help="empresa id, e.g. cota")],
    config: ConfigOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the receipt")] = 30.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing on success")] = False,
) -> None:
    """Publish a test alarm and wait until every sink confirmed it (for cron)."""
    settings = _load(config)
    try:
        emp = normalize_id(empresa)
    except IdentifierError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc
    from .checks import send_test as do_send_test

    ok, message = _trio_run(lambda: do_send_test(settings, emp, timeout))
    if not ok:
        typer.echo(f"send-test FAILED: {message}", err=True)
        raise typer.Exit(EXIT_FAIL)
    if not quiet:
        typer.echo(f"send-test OK: {message}")


@app.command()
def publish(
    tipo: Annotated[str, typer.Option(help="tipo_mensaje")],
    empresa: Annotated[str, typer.Option(help="empresa id")] = "",
    sede: Annotated[str, typer.Option(help="sede")] = "",
    campo: Annotated[
        list[str] | None,
        typer.Option(help="extra field k=v (repeatable; v parsed as JSON if it can)"),
    ] = None,
    topic: Annotated[str, typer.Option(help="topic (default: the first mqtt.topics)")] = "",
    config: ConfigOpt = None,
) -> None:
    """Publish one message, like a botonera would (QoS 1)."""
    settings = _load(config)
    body: dict[str, Any] = {"tipo_mensaje": tipo}
    if empresa:
        body["empresa"] = empresa
    if sede:
        body["sede"] = sede
    for item in campo or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            typer.echo(f"error: --campo expects k=v, got {item!r}", err=True)
            raise typer.Exit(EXIT_USAGE)
        try:
            body[k] = json.loads(v)
        except json.JSONDecodeError:
            body[k] = v
    from .checks import publish_once

    target = topic or settings.mqtt.topics[0]
    try:
        _trio_run(lambda: publish_once(settings, target, json.dumps(body).encode()))
    except MqttError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAIL) from exc
    typer.echo(f"publicado en {target}: {json.dumps(body, ensure_ascii=False)}")


@dead_app.command("list")
def dead_list(
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="newest N entries")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
) -> None:
    """List dead letters, newest first."""
    settings = _load(config)
    from .deadletters import list_dead

    try:
        items = _trio_run(lambda: list_dead(settings, limit))
    except (RedisError, BridgeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAIL) from exc
    for item in items:
        if as_json:
            typer.echo(json.dumps(item, ensure_ascii=False))
        else:
            payload = item["payload"]
            short = payload if len(payload) <= 80 else payload[:77] + "..."
            typer.echo(
                f"{item['id']}  {item['at']}  {item['reason']:<22} {item['topic']:<20} {short}"
            )
            typer.echo(f"    {item['detail']}")
    if not items and not as_json:
        typer.echo("no hay dead letters")


@dead_app.command("replay")
def dead_replay(
    entry_id: Annotated[str | None, typer.Argument(help="dead-letter id")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="replay every entry")] = False,
    config: ConfigOpt = None,
) -> None:
    """Re-inject dead letters into the outbox (they are removed once re-queued)."""
    if not entry_id and not replay_all:
        typer.echo("error: give an ID or --all", err=True)
        raise typer.Exit(EXIT_USAGE)
    settings = _load(config)
    from .deadletters import replay

    try:
        results = _trio_run(lambda: replay(settings, None if replay_all else entry_id))
    except (RedisError, BridgeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAIL) from exc
    failed = 0
    for rid, ok, detail in results:
        typer.echo(f"{'✓' if ok else '✗'} {rid}: {detail}")
        failed += not ok
    if not results:
        typer.echo(f"no dead letter {entry_id}" if entry_id else "no hay dead letters")
        raise typer.Exit(EXIT_FAIL if entry_id else EXIT_OK)
    raise typer.Exit(EXIT_FAIL if failed else EXIT_OK)


def _backend_get(settings: Settings, path: str, params: dict[str, Any] | None = None) -> Any:
    import httpx

    headers = {"User-Agent": USER_AGENT}
    if settings.backend.token:
        headers["Authorization"] = f"Bearer {settings.backend.token}"
    url = settings.backend.url.rstrip("/") + path
    try:
        resp = httpx.get(url, params=params, headers=headers, timeout=settings.backend.timeout)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the backend at {url}: {exc}", err=True)
        raise typer.Exit(EXIT_FAIL) from exc
    if resp.status_code == 404:
        typer.echo("no encontrado", err=True)
        raise typer.Exit(EXIT_FAIL)
    if resp.status_code >= 400:
        typer.echo(f"error: backend answered {resp.status_code}: {resp.text[:300]}", err=True)
        raise typer.Exit(EXIT_FAIL)
    return resp.json()


@alerts_app.command("list")
def alerts_list(
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="newest N alerts")] = 20,
    empresa: Annotated[str, typer.Option(help="only this empresa")] = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the alerts the backend stored."""
    settings = _load(config)
    params: dict[str, Any] = {"limit": limit}
    if empresa:
        params["empresa"] = empresa
    data = _backend_get(settings, "/api/mqtt-alerts", params)
    if as_json:
        typer.echo(json.dumps(data, ensure_ascii=False, indent=2))
        return
    items = data if isinstance(data, list) else data.get("items", data.get("alerts", []))
    for a in items:
        typer.echo(
            f"{a.get('id')}  {a.get('received_at', '')}  {a.get('empresa') or '-':<12} "
            f"{a.get('tipo_mensaje', '')}"
        )


@alerts_app.command("show")
def alerts_show(
    alert_id: Annotated[str, typer.Argument(help="alert id")], config: ConfigOpt = None
) -> None:
    """Show one stored alert."""
    settings = _load(config)
    typer.echo(
        json.dumps(
            _backend_get(settings, f"/api/mqtt-alerts/{alert_id}"), ensure_ascii=False, indent=2
        )
    )


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"botonera-bridge {__version__} (Python {sys.version.split()[0]})")


def send_test_identity(empresa: str) -> tuple[dict[str, Any], str]:
    """The test alarm and the event id the bridge will derive from it."""
    test_id = f"prueba-{uuid.uuid4()}"
    body = {
        "tipo_mensaje": "alarmas",
        "tipo_alarma": "PRUEBA",
        "descripcion": "Prueba automática de botonera-bridge",
        "empresa": empresa,
        "prueba": True,
        "id": test_id,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # the id the bridge derives (identity + digest of these exact bytes, as send-test
    # publishes them)
    import msgspec

    from .messages import decode

    _, event = decode(msgspec.json.encode(body), "empresas", 0, 1 << 20)
    return body, event.id


def _daemon_args(argv: list[str]) -> tuple[str | None, bool, bool] | None:
    """``run`` with only --config/-c, --[no-]mqtt, --[no-]websocket: the parsed values.

    Anything else (--help, unknown or odd options) returns None and goes through typer.
    Why: typer 0.29 coerces option values through pydantic, which costs the daemon
    ~6 MB of RSS for its whole life; these few flags need no coercion."""
    if not argv or argv[0] != "run":
        return None
    config: str | None = None
    flags = {"--mqtt": ("mqtt", True), "--no-mqtt": ("mqtt", False)}
    flags |= {"--websocket": ("ws", True), "--no-websocket": ("ws", False)}
    on = {"mqtt": True, "ws": True}
    rest = iter(argv[1:])
    for arg in rest:
        if arg in flags:
            key, value = flags[arg]
            on[key] = value
        elif arg in ("--config", "-c"):
            config = next(rest, "")
        elif arg.startswith("--config="):
            config = arg.partition("=")[2]
        else:
            return None
        if config is not None and (not config or config.startswith("-")):
            return None
    return config, on["mqtt"], on["ws"]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        daemon = _daemon_args(sys.argv[1:])
        if daemon is not None:
            try:
                run(*daemon)
            except typer.Exit as exc:
                sys.exit(exc.exit_code)
            return
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
