"""systemd notifications (``sd_notify``) without a dependency.

With ``NOTIFY_SOCKET`` set (``Type=notify`` units), :func:`notify_loop` sends
``READY=1`` once every task has started (not once the broker answers: a boot with
the broker unreachable must not fail ``systemctl start``), then ``WATCHDOG=1``
every half ``WATCHDOG_USEC`` (5 s when unset) while the event loop runs and
:meth:`Health.liveness_problems` is empty, so only a wedged bridge (a dead or stuck
task) is restarted by ``WatchdogSec=``; an outage of the broker, Redis, the backend
or the gateway shows in ``STATUS=`` (one line, shown by ``systemctl status``) and
``/readyz`` only. :func:`stopping` sends
``STOPPING=1`` at the start of shutdown. Everything is a no-op without
``NOTIFY_SOCKET``; a send that fails is logged, never raised.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Final

import trio

from ..health import Health

log = logging.getLogger(__name__)

DEFAULT_WATCHDOG_INTERVAL: Final = 5.0  # seconds between WATCHDOG=1 when WATCHDOG_USEC is unset
MAX_STATUS_CHARS: Final = 200


def _address(env: Mapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace (Linux)
    return path


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1``: half of ``WATCHDOG_USEC``, 5 s when unset;
    None when systemd's watchdog is meant for another process (``WATCHDOG_PID``)."""
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    usec = env.get("WATCHDOG_USEC", "")
    try:
        value = int(usec) if usec else 0
    except ValueError:
        log.warning("ignoring invalid WATCHDOG_USEC=%r", usec)
        value = 0
    return value / 2e6 if value > 0 else DEFAULT_WATCHDOG_INTERVAL


class _Notifier:
    """A datagram socket to ``NOTIFY_SOCKET``; sends never block and never raise."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._failing = False

    def send(self, message: str) -> bool:
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:  # includes BlockingIOError: systemd is not reading
            if not self._failing:
                log.warning("systemd notify %r failed: %s", message.split("=")[0], exc)
            self._failing = True
            return False
        if self._failing:
            log.info("systemd notify works again")
        self._failing = False
        return True

    def close(self) -> None:
        self._sock.close()


def notify(message: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """Send one notification (``"READY=1"``, ``"STATUS=..."``); False if not sent."""
    address = _address(env)
    if address is None:
        return False
    n = _Notifier(address)
    try:
        return n.send(message)
    finally:
        n.close()


def stopping(*, env: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd the bridge is shutting down (call first thing on SIGTERM)."""
    return notify("STOPPING=1\nSTATUS=deteniendo", env=env)


async def notify_loop(
    health: Health,
    ready: trio.Event,
    *,
    env: Mapping[str, str] = os.environ,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send ``READY=1`` once ``ready`` (every task started) is set, then ``WATCHDOG=1``
    while no task is dead or stuck, until cancelled. Returns at once when
    ``NOTIFY_SOCKET`` is unset."""
    address = _address(env)
    if address is None:
        task_status.started()
        return
    interval = watchdog_interval(env)
    n = _Notifier(address)
    try:
        task_status.started()
        await ready.wait()
        n.send("READY=1")
        log.info(
            "told systemd READY=1%s",
            f"; watchdog every {interval:g}s while no task is dead or stuck" if interval else "",
        )
        status = ""
        while True:
            if interval is not None and not health.liveness_problems():
                n.send("WATCHDOG=1")
            reasons = health.reasons()
            new_status = "listo" if not reasons else "no listo: " + "; ".join(reasons)
            new_status = " ".join(new_status.split())  # one line, whatever a reason holds
            if new_status != status:
                status = new_status
                n.send("STATUS=" + status[:MAX_STATUS_CHARS])
            await trio.sleep(interval if interval is not None else DEFAULT_WATCHDOG_INTERVAL)
    finally:
        n.close()
