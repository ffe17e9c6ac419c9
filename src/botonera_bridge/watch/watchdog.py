"""Heartbeat watchdog: which panels are talking, and offline/online events when that changes.

Only what promised to beat is watched: a device (``empresa/sede/dispositivo``)
is watched once it sent a ``heartbeat`` with at least an empresa, or when it is
listed in ``[[empresas]] paneles``. Every decoded message of a watched device
refreshes its last-seen time through :meth:`Watchdog.seen`, a cheap synchronous
O(1) call on the router's hot path; a source that only sends alarms is never
declared offline. :meth:`Watchdog.run` declares a device offline once it has
been silent for ``timeout`` seconds and emits queued online events when an
offline device talks again. A listed panel never seen within ``timeout`` of the
start is reported ``nunca visto`` (no event: it never was online).

State is bounded: at most ``max_devices`` devices (a WARNING and a metric when
the cap is reached), and a device silent for ``forget_after`` is forgotten.
Gauges are kept incrementally, never recounted.

State survives restarts in a :class:`~botonera_bridge.queues.state.HashStore` (the
``devices`` hash), so a restart causes no offline/online storm: after a
(re)start a device is declared offline only a full ``timeout`` after the later
of its last-seen time and the start, and a device persisted as online that
talks again emits nothing.

Event ids are derived from the device and the last-seen time the silence
started at, so an event emitted again after a crash (before the state was
written) carries the same id and the backend's idempotency drops it.

Everything is measured with the injected ``wall`` clock (seconds since the
epoch; tests pass ``trio.current_time`` under ``autojump_clock``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Final, Literal

import msgspec
import trio
from prometheus_client import Gauge

from ..config import Empresa
from ..ids import stable_id
from ..messages import Event, now_rfc3339, synthetic
from ..metrics import Metrics
from ..queues.state import HashStore

log = logging.getLogger(__name__)

DeviceStatus = Literal["online", "offline", "nunca visto"]
# "esperando": listed in the inventory, not seen yet, its first timeout still running
_State = Literal["online", "offline", "nunca visto", "esperando"]
_GAUGE_LABEL: Final = {"online": "online", "offline": "offline", "nunca visto": "nunca_visto"}

MAX_CHECK_PERIOD: Final = 1.0  # seconds; the loop also wakes at the exact next deadline
FINAL_FLUSH_TIMEOUT: Final = 2.0  # seconds allowed for the last write on shutdown
WATCHDOG_TOPIC: Final = "botonera-bridge/watchdog"
FORGET_CHECK_PERIOD: Final = 3600.0  # seconds between sweeps for forgettable devices


def inventory(empresas: Iterable[Empresa]) -> list[tuple[str, str, str]]:
    """``[[empresas]] paneles`` as (empresa, sede, dispositivo), "" for a "-" part."""
    out = []
    for e in empresas:
        for panel in e.paneles:
            sede, _, dispositivo = panel.partition("/")
            out.append(
                (e.id, "" if sede == "-" else sede, "" if dispositivo == "-" else dispositivo)
            )
    return out


class DeviceState(msgspec.Struct, frozen=True, kw_only=True):
    """One panel as ESTADO and the status page show it."""

    key: str  # empresa/sede/dispositivo, missing parts "-"
    empresa: str
    sede: str
    dispositivo: str
    state: DeviceStatus
    last_seen: float  # wall seconds


class _Stored(msgspec.Struct, kw_only=True):
    """The value kept in the ``devices`` hash (the field is the device key)."""

    last_seen: float
    state: DeviceStatus
    empresa: str = ""
    sede: str = ""
    dispositivo: str = ""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Stored).decode


class _Device:
    __slots__ = ("dispositivo", "empresa", "last_seen", "sede", "state")

    def __init__(
        self, empresa: str, sede: str, dispositivo: str, last_seen: float, state: _State
    ) -> None:
        self.empresa = empresa
        self.sede = sede
        self.dispositivo = dispositivo
        self.last_seen = last_seen
        self.state: _State = state


class Watchdog:
    """Tracks device last-seen times and emits offline/online ``estado`` events.

    ``emit`` receives each synthetic event (the app appends it to the durable
    outbox); it may block, which only delays the watchdog, never the router.
    """

    def __init__(
        self,
        *,
        timeout: float,
        store: HashStore,
        emit: Callable[[Event], Awaitable[None]],
        metrics: Metrics | None = None,
        wall: Callable[[], float] = time.time,
        max_devices: int = 10_000,
        forget_after: float = 7 * 86400.0,
        inventory: Iterable[tuple[str, str, str]] = (),
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"watchdog timeout must be positive, got {timeout!r}")
        self.timeout = timeout
        self.max_devices = max_devices
        self.forget_after = forget_after
        self._inventory = tuple(inventory)  # (empresa, sede, dispositivo), "" for none
        self._counts: dict[_State, int] = {
            "online": 0, "offline": 0, "nunca visto": 0, "esperando": 0
        }  # fmt: skip
        self._capped = False  # the max_devices WARNING is logged once per episode
        # the gauge children, looked up once: labels() costs more than the rest of seen()
        self._gauges: dict[str, Gauge] = {}
        if metrics is not None:
            self._gauges = {s: metrics.devices.labels(state=lb) for s, lb in _GAUGE_LABEL.items()}
        self.period = min(MAX_CHECK_PERIOD, timeout / 4)
        self._store = store
        self._emit = emit
        self._metrics = metrics
        self._wall = wall
        self._devices: dict[str, _Device] = {}
        self._by_empresa: dict[str, dict[str, _Device]] = {}  # empresa -> key -> device
        self._dirty: set[str] = set()
        # keys whose transition event is not emitted yet: never persisted meanwhile,
        # so a crash before emission re-declares rather than forgets the transition
        self._pending: set[str] = set()
        self._online_queue: list[tuple[str, Event]] = []
        self._wakeup = trio.Event()
        self._started_at: float | None = None  # wall time run() loaded the store
        self._loaded = False

    # -- hot path ------------------------------------------------------------------

    def seen(self, event: Event) -> None:
        """Refresh the last-seen time of ``event``'s device; queue an online event if it
        was offline. Synchronous and cheap: called for every decoded message."""
        if event.prueba or event.origen == "watchdog":
            # prueba: send-test from the CLI; watchdog: our own events, should they
            # ever be routed back here
            return
        if not event.empresa:
            # cannot be attributed to a panel: never watched, a heartbeat is counted
            if event.tipo == "heartbeat" and self._metrics is not None:
                self._metrics.heartbeats_unidentified.inc()
            return
        key = event.device_key
        dev = self._devices.get(key)
        if dev is None:
            if event.tipo != "heartbeat":
                return  # never promised to beat: its silence is not an outage
            if len(self._devices) >= self.max_devices:
                self._refuse(key)
                return
            dev = _Device(event.empresa, event.sede, event.dispositivo, self._wall(), "online")
            self._add(key, dev)
            self._dirty.add(key)
            return
        now = self._wall()
        if dev.state == "offline":
            self._queue_online(key, dev, now, dev.last_seen)
        elif dev.state in ("esperando", "nunca visto"):
            self._set_state(dev, "online")  # a listed panel shows up: it was never online
        dev.last_seen = now
        self._dirty.add(key)

    def _refuse(self, key: str) -> None:
        if self._metrics is not None:
            self._metrics.devices_capped.inc()
        if not self._capped:
            self._capped = True
            log.warning(
                "heartbeat.max_devices (%d) reached: new panels are not watched "
                "(first refused: %s); raise the cap or look for a panel flooding new ids",
                self.max_devices,
                key,
            )

    def _queue_online(self, key: str, dev: _Device, now: float, silent_since: float) -> None:
        ev = self._event(dev, "online", now, silent_since)
        self._set_state(dev, "online")
        self._pending.add(key)
        self._online_queue.append((key, ev))
        self._wakeup.set()

    def _set_state(self, dev: _Device, state: _State) -> None:
        self._count(dev.state, state)
        dev.state = state

    def _count(self, old: _State | None, new: _State | None) -> None:
        """Incremental gauges: O(1) per change, never a recount over all devices."""
        if old is not None:
            self._counts[old] -= 1
        if new is not None:
            self._counts[new] += 1
        for state in (old, new):
            if state is not None and (gauge := self._gauges.get(state)) is not None:
                gauge.set(self._counts[state])

    # -- readers -------------------------------------------------------------------

    def _add(self, key: str, dev: _Device) -> None:
        self._devices[key] = dev
        self._by_empresa.setdefault(dev.empresa, {})[key] = dev
        self._count(None, dev.state)

    def devices(self, empresa: str | None = None) -> list[DeviceState]:
        """Every watched device (of ``empresa``: an index, not a scan), sorted by key; a
        listed panel not yet due is left out."""
        devices = self._devices if empresa is None else self._by_empresa.get(empresa, {})
        return [
            DeviceState(
                key=key,
                empresa=d.empresa,
                sede=d.sede,
                dispositivo=d.dispositivo,
                state=d.state,
                last_seen=d.last_seen,
            )
            for key, d in sorted(devices.items())
            if d.state != "esperando"
        ]

    def devices_of(self, empresas: Collection[str]) -> list[DeviceState]:
        """The devices of these empresas, from the per-empresa index (status model)."""
        return [d for e in empresas for d in self.devices(e)]

    @property
    def counts(self) -> dict[str, int]:
        """Devices per state, kept incrementally."""
        return {state: n for state, n in self._counts.items()}

    # -- the task ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """:meth:`load`, then :meth:`loop` until cancelled."""
        await self.load()
        task_status.started()
        await self.loop()

    async def load(self) -> None:
        """Load persisted state (once, before any check)."""
        await self._store.load()
        self._started_at = self._wall()
        self._adopt_stored()
        log.info(
            "watchdog running: %d devices known, timeout %.0fs", len(self._devices), self.timeout
        )

    async def loop(self) -> None:
        """Declare silent devices offline and emit online events until cancelled. Writes
        state at most once per check period, and once more (shielded, bounded) on the way
        out. Re-entrant: after a crash the app's supervisor calls it again, and a transition
        whose event may not be out is declared again (same event id)."""
        self._resume()
        last_flush = -math.inf
        last_forget = self._wall()
        try:
            while True:
                await self._emit_online()
                await self._expire()
                if self._wall() - last_forget >= min(FORGET_CHECK_PERIOD, self.forget_after):
                    last_forget = self._wall()
                    self._forget(last_forget)
                now = self._wall()
                if self._dirty and now - last_flush >= self.period:
                    last_flush = now
                    await self._flush()
                await self._sleep_until_next()
        finally:
            with trio.move_on_after(FINAL_FLUSH_TIMEOUT, shield=True):
                await self._flush()

    def _resume(self) -> None:
        """Offline transitions an interrupted run left half-done go back to online, so
        _expire declares them again with the same id (queued online events stay queued)."""
        queued = {key for key, _ in self._online_queue}
        for key in list(self._pending - queued):
            dev = self._devices.get(key)
            if dev is not None and dev.state == "offline":
                self._set_state(dev, "online")
            self._pending.discard(key)

    def _adopt_stored(self) -> None:
        for key, raw in self._store.data.items():
            try:
                stored = _decode(raw)
            except msgspec.DecodeError as exc:
                log.warning("ignoring unreadable device state %r: %s", key, exc)
                continue
            dev = self._devices.get(key)
            if dev is None:
                if len(self._devices) >= self.max_devices:
                    self._refuse(key)
                    continue
                state: _State = stored.state if stored.state in _GAUGE_LABEL else "online"
                self._add(
                    key,
                    _Device(
                        stored.empresa, stored.sede, stored.dispositivo, stored.last_seen, state
                    ),
                )
            elif stored.state == "offline" and key not in self._pending:
                # seen before the store was loaded, but it had been declared offline
                self._queue_online(key, dev, dev.last_seen, stored.last_seen)
        for empresa, sede, dispositivo in self._inventory:
            key = f"{empresa}/{sede or '-'}/{dispositivo or '-'}"
            if key not in self._devices:
                assert self._started_at is not None
                self._add(key, _Device(empresa, sede, dispositivo, self._started_at, "esperando"))
        self._loaded = True

    def reconfigure(self, inventory: Iterable[tuple[str, str, str]]) -> None:
        """SIGHUP: a newly listed panel is expected from now on; an unlisted one that never
        showed up is dropped (it never was online: no event). Seen devices are kept."""
        self._inventory = tuple(inventory)
        if not self._loaded:
            return  # load() adds the listed panels
        listed = {f"{e}/{s or '-'}/{d or '-'}": (e, s, d) for e, s, d in self._inventory}
        for key, dev in list(self._devices.items()):
            if key not in listed and dev.state in ("esperando", "nunca visto"):
                del self._devices[key]
                self._by_empresa.get(dev.empresa, {}).pop(key, None)
                self._count(dev.state, None)
        now = self._wall()
        for key, (empresa, sede, dispositivo) in listed.items():
            if key not in self._devices and len(self._devices) < self.max_devices:
                self._add(key, _Device(empresa, sede, dispositivo, now, "esperando"))

    def _forget(self, now: float) -> None:
        """Drop devices silent for ``forget_after`` (a periodic sweep, off the hot path)."""
        listed = {f"{e}/{s or '-'}/{d or '-'}" for e, s, d in self._inventory}
        old = [
            key
            for key, d in self._devices.items()
            if now - d.last_seen >= self.forget_after and key not in self._pending
            and key not in listed
        ]  # fmt: skip
        for key in old:
            dev = self._devices.pop(key)
            self._by_empresa.get(dev.empresa, {}).pop(key, None)
            self._count(dev.state, None)
            self._dirty.discard(key)
            self._store.delete(key)
            if self._metrics is not None:
                self._metrics.devices_forgotten.inc()
        if old:
            log.info("forgot %d panels silent for %.0fs or more", len(old), self.forget_after)
        if self._capped and len(self._devices) < self.max_devices:
            self._capped = False

    def _deadline(self, dev: _Device) -> float:
        start = self._started_at if self._started_at is not None else dev.last_seen
        return max(dev.last_seen, start) + self.timeout

    async def _emit_online(self) -> None:
        while self._online_queue:
            key, ev = self._online_queue[0]
            await self._emit(ev)
            del self._online_queue[0]
            self._pending.discard(key)
            log.info("device %s is back online", key)

    async def _expire(self) -> None:
        now = self._wall()
        expired = [
            key
            for key, d in self._devices.items()
            if d.state in ("online", "esperando")
            and key not in self._pending
            and self._deadline(d) <= now
        ]
        for key in expired:
            dev = self._devices[key]
            if dev.state == "esperando":
                self._set_state(dev, "nunca visto")  # listed, never showed up: no event
                log.warning("listed panel %s never seen since the start", key)
                continue
            if dev.state != "online" or self._deadline(dev) > self._wall():
                continue  # it talked while an earlier emit was blocked
            silent_since = dev.last_seen
            ev = self._event(dev, "offline", self._wall(), silent_since)
            # offline before the await: a message arriving meanwhile queues "online"
            self._set_state(dev, "offline")
            self._pending.add(key)
            self._dirty.add(key)
            await self._emit(ev)
            self._pending.discard(key)
            log.warning(
                "device %s offline: silent since %s", key, now_rfc3339(int(silent_since * 1e9))
            )

    async def _sleep_until_next(self) -> None:
        now = self._wall()
        delay = self.period
        for key, d in self._devices.items():
            if d.state in ("online", "esperando") and key not in self._pending:
                delay = min(delay, self._deadline(d) - now)
        if self._online_queue:
            return
        self._wakeup = trio.Event()
        with trio.move_on_after(max(delay, 0.0)):
            await self._wakeup.wait()

    async def _flush(self) -> None:
        if not self._loaded:
            return
        for key in list(self._dirty):
            if key in self._pending:
                continue  # written once its event is out
            dev = self._devices.get(key)
            if dev is None or dev.state not in ("online", "offline"):
                self._dirty.discard(key)  # forgotten, or a listed panel never seen
                continue
            self._store.set(
                key,
                _encode(
                    _Stored(
                        last_seen=dev.last_seen,
                        state="online" if dev.state == "online" else "offline",
                        empresa=dev.empresa,
                        sede=dev.sede,
                        dispositivo=dev.dispositivo,
                    )
                ),
            )
            self._dirty.discard(key)
        await self._store.flush()

    # -- helpers -------------------------------------------------------------------

    def _event(self, dev: _Device, status: DeviceStatus, now: float, silent_since: float) -> Event:
        """``silent_since`` is the last-seen time the silence started from: it is the
        ``ultimo_visto`` of both events of one episode and the seed of their ids."""
        key = f"{dev.empresa or '-'}/{dev.sede or '-'}/{dev.dispositivo or '-'}"
        received_ns = int(now * 1e9)
        obj: dict[str, str] = {"tipo_mensaje": "estado", "status": status, "empresa": dev.empresa}
        if dev.sede:
            obj["sede"] = dev.sede
        if dev.dispositivo:
            obj["dispositivo"] = dev.dispositivo
        obj["ultimo_visto"] = now_rfc3339(int(silent_since * 1e9))
        obj["timestamp"] = now_rfc3339(received_ns)
        return synthetic(
            obj,
            origen="watchdog",
            topic=WATCHDOG_TOPIC,
            received_ns=received_ns,
            empresa=dev.empresa,
            sede=dev.sede,
            dispositivo=dev.dispositivo,
            event_id=stable_id("watchdog", key, status, repr(silent_since)),
            detail={"status": status},
        )
