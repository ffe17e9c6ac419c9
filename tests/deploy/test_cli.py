"""Must-show 5 and 7: the CLI fails in one line naming the cause, with its exit code;
TLS with a password against a real mosquitto delivers an alarm."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backend import Backend
from tests.support.bridge import BridgeProc, wait_until, write_toml
from tests.support.procs import Mosquitto, free_port

PASSWORD = "clave-de-prueba"  # noqa: S105 - a throwaway password of a private test broker


def cli(tmp_path: Path, conf: dict[str, Any], *args: str, timeout: float = 30) -> Any:
    path = tmp_path / "cli.toml"
    write_toml(path, conf)
    return subprocess.run(
        [sys.executable, "-m", "botonera_bridge", *args, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def base(mqtt: dict[str, Any], backend_url: str) -> dict[str, Any]:
    return {
        "mqtt": {"broker": "127.0.0.1", **mqtt},
        "backend": {"url": backend_url},
        "redis": {"url": ""},
        "websocket": {"url": ""},
    }


def broker_line(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith(("✓ broker", "✗ broker"))]
    return line


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> Path:
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d,
    )  # fmt: skip
    return d / f"{name}.crt"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    d = tmp_path_factory.mktemp("certs")
    ca = make_ca(d, "ca")
    other = make_ca(d, "otra-ca")
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr", cwd=d,
    )  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=d,
    )  # fmt: skip
    return {"ca": ca, "other": other, "crt": d / "server.crt", "key": d / "server.key"}


@pytest.fixture
def secure_broker(
    make_mosquitto: Callable[..., Mosquitto], certs: dict[str, Path], tmp_path: Path
) -> Mosquitto:
    """mosquitto with TLS only and a password file (user 'bridge')."""
    pwfile = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(pwfile), "bridge", PASSWORD],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return make_mosquitto(
        extra=(
            f"cafile {certs['ca']}\ncertfile {certs['crt']}\nkeyfile {certs['key']}\n"
            f"allow_anonymous false\npassword_file {pwfile}\n"
        )
    )


@pytest.fixture
def redirecting_backend() -> Iterator[str]:
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(301)
            self.send_header("Location", "https://backend.example.invalid/api/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_broker_refused_and_unknown_host(tmp_path: Path, backend: Backend) -> None:
    refused = cli(tmp_path, base({"port": free_port()}, backend.url), "check-config")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert broker_line(refused.stdout).startswith("✗")
    assert "conexión rechazada" in broker_line(refused.stdout)
    assert "Traceback" not in refused.stderr

    conf = base({"port": 1883}, backend.url)
    conf["mqtt"]["broker"] = "broker.botonera.invalid"
    unknown = cli(tmp_path, conf, "check-config")
    assert unknown.returncode == 1
    assert "host desconocido" in broker_line(unknown.stdout)
    assert "✓ backend" in unknown.stdout


def test_bad_password_and_bad_ca(
    tmp_path: Path, backend: Backend, secure_broker: Mosquitto, certs: dict[str, Path]
) -> None:
    tls = {"port": secure_broker.port, "tls": True, "username": "bridge"}
    wrong = cli(
        tmp_path,
        base({**tls, "ca_file": str(certs["ca"]), "password": "otra"}, backend.url),
        "check-config",
    )
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    line = broker_line(wrong.stdout)
    assert "credenciales rechazadas" in line
    assert "Not authorized" in line or "Bad user name or password" in line
    assert "otra" not in wrong.stdout.replace('"password": "****"', "")

    bad_ca = cli(
        tmp_path,
        base({**tls, "ca_file": str(certs["other"]), "password": PASSWORD}, backend.url),
        "check-config",
    )
    assert bad_ca.returncode == 1
    line = broker_line(bad_ca.stdout)
    assert "certificado" in line
    assert "certificate verify failed" in line.lower()

    good = cli(
        tmp_path,
        base({**tls, "ca_file": str(certs["ca"]), "password": PASSWORD}, backend.url),
        "check-config",
        "--json",
    )
    report = json.loads(good.stdout)
    assert good.returncode == 0, good.stdout
    assert report["ok"] is True
    assert {c["name"].split()[0] for c in report["checks"] if c["ok"]} >= {"broker", "backend"}
    assert PASSWORD not in good.stdout


def test_backend_redirect_is_a_failure(
    tmp_path: Path, mosquitto: Mosquitto, redirecting_backend: str
) -> None:
    res = cli(tmp_path, base({"port": mosquitto.port}, redirecting_backend), "check-config")
    assert res.returncode == 1
    (line,) = [ln for ln in res.stdout.splitlines() if "backend" in ln and ln[:1] in "✓✗"]
    assert line.startswith("✗")
    assert "redirección: configure la URL final" in line


def test_publish_broker_down_one_line_fast(tmp_path: Path, backend: Backend) -> None:
    t0 = time.monotonic()
    res = cli(
        tmp_path,
        base({"port": free_port()}, backend.url),
        "publish",
        "--tipo",
        "alarmas",
        "--empresa",
        "cota",
    )
    assert time.monotonic() - t0 < 10
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "conexión rechazada" in res.stderr
    bogus = cli(tmp_path, base({"port": free_port()}, backend.url), "publish", "--tipo", "bogus")
    assert bogus.returncode == 2
    assert "publicado" not in bogus.stdout
    assert "--tipo" in bogus.stderr


def test_invalid_values_exit_2_naming_the_key(tmp_path: Path) -> None:
    conf = base({"port": 1883}, "http://127.0.0.1:1")
    conf["websocket"]["url"] = "http://gateway.example.invalid/ws"
    for args in (("check-config", "--offline"), ("run", "--no-mqtt")):
        res = cli(tmp_path, conf, *args)
        assert res.returncode == 2, (args, res.stderr)
        assert "websocket.url" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    conf["websocket"]["url"] = ""
    conf["redis"]["url"] = "memcached://127.0.0.1:1"
    res = cli(tmp_path, conf, "check-config", "--offline")
    assert res.returncode == 2
    assert "redis.url" in res.stderr
    conf["redis"]["url"] = ""
    conf["heartbeat"] = {"timeout": -5}
    res = cli(tmp_path, conf, "check-config", "--offline")
    assert res.returncode == 2
    assert "heartbeat.timeout" in res.stderr


def test_version() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "botonera_bridge", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0
    assert res.stdout.startswith("botonera-bridge ")


def test_tls_with_password_delivers_an_alarm(
    secure_broker: Mosquitto,
    certs: dict[str, Path],
    bridge_factory: Callable[..., BridgeProc],
    backend: Backend,
    tmp_path: Path,
) -> None:
    """Must-show 7: the bridge on a TLS-only, password-protected mosquitto."""
    pwfile = tmp_path / "mqtt_password"
    pwfile.write_text(PASSWORD + "\n")
    bridge = bridge_factory(
        mqtt_port=secure_broker.port,
        conf={
            "mqtt": {
                "broker": "127.0.0.1",
                "port": secure_broker.port,
                "client_id": "bridge-tls",
                "tls": True,
                "ca_file": str(certs["ca"]),
                "username": "bridge",
            }
        },
        env={"CREDENTIALS_DIRECTORY": str(tmp_path)},  # the password via LoadCredential=
    ).start()
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="pub-tls")
    pub.tls_set(ca_certs=str(certs["ca"]))
    pub.username_pw_set("bridge", PASSWORD)
    pub.connect("127.0.0.1", secure_broker.port)
    pub.loop_start()
    try:
        info = pub.publish(
            "empresas",
            json.dumps({"tipo_mensaje": "alarmas", "tipo_alarma": "CRITICA", "empresa": "cota"}),
            qos=1,
        )
        info.wait_for_publish(10)
        wait_until(lambda: len(backend.alerts()) == 1, 15, "the alarm at the backend")
    finally:
        pub.loop_stop()
        pub.disconnect()
    assert backend.alerts()[0]["payload"]["tipo_alarma"] == "CRITICA"
    assert PASSWORD not in bridge.log_text()
    assert bridge.terminate() == 0
