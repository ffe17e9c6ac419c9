"""Private mosquitto and redis-server instances for integration and fault tests.

Each instance runs on a free loopback port in its own temp dir, so a test can
kill -9 it and start it again on the same port and data dir. Only processes we
started are ever signalled, by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class _Proc:
    name = "proc"

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self.dir = workdir or Path(tempfile.mkdtemp(prefix=f"bb-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / f"{self.name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        wait_port(self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to flush or say goodbye."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Mosquitto(_Proc):
    name = "mosquitto"

    def __init__(
        self,
        port: int | None = None,
        *,
        persistence: bool = True,
        extra: str = "",
    ) -> None:
        super().__init__(port)
        self.persistence = persistence
        self.extra = extra

    def argv(self) -> list[str]:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # as root mosquitto drops to user 'mosquitto', which cannot write our temp dir
            "user root\n"
            f"persistence {'true' if self.persistence else 'false'}\n"
            f"persistence_location {self.dir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            f"{self.extra}\n"
        )
        return [_which("mosquitto"), "-c", str(conf)]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"


class Redis(_Proc):
    name = "redis"

    def __init__(self, port: int | None = None, *, appendonly: bool = True) -> None:
        super().__init__(port)
        self.appendonly = appendonly

    def argv(self) -> list[str]:
        return [
            _which("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
        ]  # fmt: skip

    def start(self) -> None:
        super().start()
        # the port opens before an AOF is loaded: wait until Redis answers PONG
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"redis on {self.port} still loading after 10s")

    def wipe(self) -> None:
        """Forget everything on disk: the next start is an empty Redis."""
        assert not self.running()
        for p in self.dir.iterdir():
            if p.name != self.log.name:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _which(cmd: str) -> str:
    path = shutil.which(cmd) or shutil.which(cmd, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise RuntimeError(f"{cmd} is not installed (apt-get install {cmd})")
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
