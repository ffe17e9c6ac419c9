"""The command line (typer). Exit codes: 0 ok, 1 failed check/operation, 2 usage or
config error, 130 interrupted."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, TypeVar

import typer

from .. import USER_AGENT, __version__
from .. import config as config_mod
from .. import log as log_mod
from ..config import Settings
from ..errors import BridgeError, ConfigError, MqttError, RedisError
from ..heap import fix_mmap_threshold
from ..ids import IdentifierError, normalize_id
from ..messages import TIPOS

EXIT_OK: Final = 0
EXIT_FAIL: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
T = TypeVar("T")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # a failure is one line (main), never a rich traceback
    rich_markup_mode=None,  # plain click help: rich and markdown-it cost ~0.2 s per start
    help="botonera-bridge: botoneras (MQTT) al backend de alertas y a WhatsApp.\n\n"
    "Ejemplo: botonera-bridge check-config --config /etc/botonera-bridge/botonera-bridge.toml",
)
dead_app = typer.Typer(
    no_args_is_help=True,
    help="Ver y reinyectar dead letters.\n\nEjemplo: botonera-bridge dead-letters list --limit 5",
)
alerts_app = typer.Typer(
    no_args_is_help=True,
    help="Consultar las alertas guardadas en el backend.\n\n"
    "Ejemplo: botonera-bridge alerts list --empresa cota",
)
app.add_typer(dead_app, name="dead-letters")
app.add_typer(alerts_app, name="alerts")

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        metavar="ARCHIVO",
        help="archivo TOML (si no, $BOTONERA_CONFIG, si no, ./botonera-bridge.toml)",
    ),
]
log = logging.getLogger("botonera_bridge.cli.main")


def _load(config: str | None) -> Settings:
    try:
        return config_mod.load(config)
    except ConfigError as exc:
        typer.echo(f"error de configuración: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc


def _trio_run(fn: Callable[[], Awaitable[T]]) -> T:
    import trio  # imported late: keeps `--help` and `version` fast

    try:
        return trio.run(fn)
    except KeyboardInterrupt:
        typer.echo("interrumpido", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def run(
    config: ConfigOpt = None,
    mqtt: Annotated[
        bool, typer.Option("--mqtt/--no-mqtt", help="leer las botoneras por MQTT")
    ] = True,
    websocket: Annotated[
        bool,
        typer.Option("--websocket/--no-websocket", help="leer las respuestas de WhatsApp"),
    ] = True,
) -> None:
    """Correr el puente (el servicio).

    Ejemplo: botonera-bridge run --config /etc/botonera-bridge/botonera-bridge.toml
    """
    # SIGHUP's default action ends the process: ignore it until the bridge's own handler
    # (a config reload) is installed, so an early `systemctl reload` cannot kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise _Serve(_load(config), mqtt=mqtt, websocket=websocket)


daemon_app = typer.Typer(  # `run` alone, for the daemon (see _command)
    add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None
)
for _typer_app in (app, daemon_app):
    _typer_app.command()(run)


class _Serve(Exception):  # noqa: N818 - a hand-over, not an error
    """``run``'s parsed options, carried out of typer: see :func:`_command`."""

    def __init__(self, settings: Settings, *, mqtt: bool, websocket: bool) -> None:
        super().__init__("run")
        self.settings, self.mqtt, self.websocket = settings, mqtt, websocket


def _command(argv: list[str]) -> _Serve | None:
    """Run the command ``argv`` names; for ``run``, return its options instead.

    Why: typer builds a click parser for every command of an app from its annotations,
    and the bridge would run inside it for its whole life. ``run`` is parsed by an app
    of its own, and the bridge starts once typer returned (idle RSS, see make bench)."""
    try:
        if argv[:1] == ["run"]:
            daemon_app(argv[1:], prog_name="botonera-bridge run")
        else:
            # A command reports a broker failure in its one line (checks.cause); the
            # client's reconnect warnings, meant for the daemon's log, would repeat it.
            logging.getLogger("botonera_bridge.intake.mqtt").setLevel(logging.CRITICAL)
            app()
    except _Serve as serve:
        return serve.with_traceback(None)  # the parser's frames go with the traceback
    return None


def _serve(serve: _Serve) -> int:
    """The bridge, until SIGTERM/SIGINT; the exit code."""
    settings = serve.settings
    log_mod.setup(settings.log.level, settings.log.format)
    fix_mmap_threshold()  # big MQTT payloads go back to the system once freed
    import trio

    from ..app import run as app_run

    try:
        return trio.run(
            lambda: app_run(settings, mqtt_enabled=serve.mqtt, ws_enabled=serve.websocket)
        )
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        log.critical("fatal configuration error: %s", exc)
        return EXIT_USAGE


@app.command("check-config")
def check_config(
    config: ConfigOpt = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="solo validar, sin contactar a nadie")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="un informe JSON legible por scripts")
    ] = False,
) -> None:
    """Validar la configuración y probar broker, Redis, backend, gateway y WhatsApp.

    Muestra la configuración efectiva (secretos enmascarados) y una línea ✓/✗ por
    servidor, con la causa de cada falla.

    Salida: 0 todo bien, 1 falló una prueba, 2 configuración inválida.

    Ejemplo: botonera-bridge check-config --offline --config botonera-bridge.toml
    """
    try:
        settings = config_mod.load(config)
    except ConfigError as exc:
        if as_json:
            report = {"ok": False, "error": str(exc), "key": exc.key, "checks": []}
            typer.echo(json.dumps(report, ensure_ascii=False))
        else:
            typer.echo(f"error de configuración: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc
    results: list[tuple[bool, str, str]] = []
    if not offline:
        from .checks import run_checks

        results = _trio_run(lambda: run_checks(settings))
    ok = all(r[0] for r in results)
    if as_json:
        report = {
            "ok": ok,
            "source": settings.source,
            "config": config_mod.masked(settings),
            "checks": [{"ok": r[0], "name": r[1], "detail": r[2]} for r in results],
        }
        typer.echo(json.dumps(report, ensure_ascii=False, indent=2))
        raise typer.Exit(EXIT_OK if ok else EXIT_FAIL)
    typer.echo(f"# configuración efectiva ({settings.source})")
    typer.echo(json.dumps(config_mod.masked(settings), indent=2, ensure_ascii=False))
    if offline:
        typer.echo("✓ configuración válida")
        raise typer.Exit(EXIT_OK)
    for r_ok, name, detail in results:
        typer.echo(f"{'✓' if r_ok else '✗'} {name}: {detail}")
    raise typer.Exit(EXIT_OK if ok else EXIT_FAIL)


@app.command("send-test")
def send_test(
    empresa: Annotated[str, typer.Option(help="id de la empresa, p. ej. cota")],
    config: ConfigOpt = None,
    timeout: Annotated[float, typer.Option(help="segundos de espera del recibo")] = 30.0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="no imprimir nada si sale bien")
    ] = False,
) -> None:
    """Publicar una alarma de prueba y esperar su recibo (para cron).

    Salida 0 si backend y WhatsApp la confirmaron; 1 con la etapa que falló.

    Ejemplo: botonera-bridge send-test --empresa cota --quiet
    """
    settings = _load(config)
    try:
        emp = normalize_id(empresa)
    except IdentifierError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc
    from .checks import send_test as do_send_test

    ok, message = _trio_run(lambda: do_send_test(settings, emp, timeout))
    if not ok:
        typer.echo(f"send-test FALLÓ: {message}", err=True)
        raise typer.Exit(EXIT_FAIL)
    if not quiet:
        typer.echo(f"send-test OK: {message}")


@app.command()
def publish(
    tipo: Annotated[str, typer.Option(help="tipo_mensaje: " + ", ".join(TIPOS))],
    empresa: Annotated[str, typer.Option(help="id de la empresa")] = "",
    sede: Annotated[str, typer.Option(help="sede")] = "",
    campo: Annotated[
        list[str] | None,
        typer.Option(help="campo extra k=v (repetible; v se lee como JSON si se puede)"),
    ] = None,
    topic: Annotated[str, typer.Option(help="topic (por defecto el primero de mqtt.topics)")] = "",
    config: ConfigOpt = None,
) -> None:
    """Publicar un mensaje como lo haría una botonera (QoS 1).

    Ejemplo: botonera-bridge publish --tipo alarmas --empresa cota --campo tipo_alarma=CRITICA
    """
    if tipo not in TIPOS:
        typer.echo(f"error: --tipo {tipo!r} no existe; use uno de: {', '.join(TIPOS)}", err=True)
        raise typer.Exit(EXIT_USAGE)
    settings = _load(config)
    body: dict[str, Any] = {"tipo_mensaje": tipo}
    if empresa:
        body["empresa"] = empresa
    if sede:
        body["sede"] = sede
    for item in campo or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            typer.echo(f"error: --campo espera k=v, no {item!r}", err=True)
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
    limit: Annotated[int, typer.Option(help="las N más recientes")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="una línea JSON por entrada")] = False,
) -> None:
    """Listar dead letters, la más reciente primero.

    Ejemplo: botonera-bridge dead-letters list --limit 5 --json
    """
    settings = _load(config)
    from ..queues.deadletters import list_dead

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
    entry_id: Annotated[str | None, typer.Argument(help="id de la dead letter")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="reinyectar todas")] = False,
    config: ConfigOpt = None,
) -> None:
    """Reinyectar dead letters en el outbox (se borran una vez en cola).

    Ejemplo: botonera-bridge dead-letters replay 1700000000000-0
    """
    if not entry_id and not replay_all:
        typer.echo("error: indique un ID o --all", err=True)
        raise typer.Exit(EXIT_USAGE)
    settings = _load(config)
    from ..queues.deadletters import replay

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
        typer.echo(f"error: no se pudo contactar el backend en {url}: {exc}", err=True)
        raise typer.Exit(EXIT_FAIL) from exc
    if resp.status_code == 404:
        typer.echo("no encontrado", err=True)
        raise typer.Exit(EXIT_FAIL)
    if resp.status_code >= 400:
        typer.echo(f"error: el backend respondió {resp.status_code}: {resp.text[:300]}", err=True)
        raise typer.Exit(EXIT_FAIL)
    return resp.json()


@alerts_app.command("list")
def alerts_list(
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="las N más recientes")] = 20,
    empresa: Annotated[str, typer.Option(help="solo esta empresa")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="JSON")] = False,
) -> None:
    """Listar las alertas que guardó el backend.

    Ejemplo: botonera-bridge alerts list --empresa cota --limit 10
    """
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
    alert_id: Annotated[str, typer.Argument(help="id de la alerta")], config: ConfigOpt = None
) -> None:
    """Mostrar una alerta guardada.

    Ejemplo: botonera-bridge alerts show 42
    """
    settings = _load(config)
    typer.echo(
        json.dumps(
            _backend_get(settings, f"/api/mqtt-alerts/{alert_id}"), ensure_ascii=False, indent=2
        )
    )


def _version_text() -> str:
    return f"botonera-bridge {__version__} (Python {sys.version.split()[0]})"


@app.command()
def timeline(
    event_id: Annotated[str, typer.Argument(help="event id of the alarm")],
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="the raw JSON")] = False,
) -> None:
    """Print an alarm's timeline from the running bridge (received, backend, who was
    reached, who read it, who took it, escalations)."""
    from . import timeline as timeline_mod

    settings = _load(config)
    try:
        data = timeline_mod.fetch(settings, event_id)
    except timeline_mod.TimelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAIL) from exc
    typer.echo(
        json.dumps(data, ensure_ascii=False, indent=2) if as_json else timeline_mod.render(data)
    )


@app.command()
def version() -> None:
    """Mostrar la versión (también: --version).

    Ejemplo: botonera-bridge version
    """
    typer.echo(_version_text())


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_version_text())
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="mostrar la versión y salir"
        ),
    ] = False,
) -> None:
    """botonera-bridge: botoneras (MQTT) al backend de alertas y a WhatsApp."""


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    code = EXIT_OK
    try:
        serve = _command(sys.argv[1:])
        if serve is not None:
            code = _serve(serve)
    # One line and an exit code, whatever a command or a task group raised: exception
    # groups (trio nurseries) are unwrapped here, at the top, and nowhere else.
    except* KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except* ConfigError as group:
        typer.echo(f"error de configuración: {_first(group)}", err=True)
        code = EXIT_USAGE
    except* (BridgeError, OSError) as group:
        typer.echo(f"error: {_first(group)}", err=True)
        code = EXIT_FAIL
    sys.exit(code)


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    return leaves[0]
