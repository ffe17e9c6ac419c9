"""Internal liveness: components report state and progress; readiness is derived from it."""

from __future__ import annotations

from collections.abc import Callable

import trio

from .redact import mask_urls_in


class Health:
    """What each long-lived component last said about itself.

    ``connected`` components (mqtt, redis, websocket) report up/down; sinks report
    pending work and progress, so a sink sitting on work for ``stall_timeout`` is
    not ready; a task that died is never ready again.
    """

    def __init__(
        self, stall_timeout: float, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self.stall_timeout = stall_timeout
        self._clock = clock
        self.up: dict[str, bool] = {}
        self.why_down: dict[str, str] = {}
        self.required: set[str] = set()
        self._pending: dict[str, int] = {}
        self._last_progress: dict[str, float] = {}
        self._last_attempt: dict[str, float] = {}
        self.dead: dict[str, str] = {}

    def require(self, component: str) -> None:
        """Readiness depends on this component being up."""
        self.required.add(component)
        self.up.setdefault(component, False)
        self.why_down.setdefault(component, "not connected yet")

    def set(self, component: str, up: bool, reason: str = "") -> None:
        self.up[component] = up
        # reasons reach /readyz, STATUS= and the status page: no secret inside a URL
        self.why_down[component] = "" if up else (mask_urls_in(reason) or "down")

    def progress(self, sink: str, pending: int) -> None:
        """A sink finished an item (or reports its backlog); resets its stall timer."""
        self._pending[sink] = pending
        self._last_progress[sink] = self._clock()

    def waiting(self, sink: str, pending: int) -> None:
        """A sink reports its backlog without having finished anything."""
        if self._pending.get(sink, 0) == 0 and pending > 0:
            self._last_progress[sink] = self._clock()
        self._pending[sink] = pending
        self._last_progress.setdefault(sink, self._clock())

    def attempted(self, sink: str) -> None:
        """A sink tried (and failed) to deliver: it is alive, the world is not."""
        self._last_attempt[sink] = self._clock()

    def task_died(self, name: str, error: str) -> None:
        self.dead[name] = error

    def reasons(self) -> list[str]:
        """Empty when ready; otherwise one human-readable reason per problem."""
        out = [
            f"{c}: {self.why_down.get(c) or 'down'}"
            for c in sorted(self.required)
            if not self.up.get(c)
        ]
        now = self._clock()
        for sink, pending in sorted(self._pending.items()):
            idle = now - self._last_progress.get(sink, now)
            if pending > 0 and idle >= self.stall_timeout:
                out.append(f"{sink}: stalled, {pending} pending, no progress for {idle:.0f}s")
        out.extend(f"task {n} died: {e}" for n, e in sorted(self.dead.items()))
        return out

    def liveness_problems(self) -> list[str]:
        """What systemd's watchdog must hear about: a dead task, or a sink with work that
        neither finished nor even attempted anything for ``stall_timeout``. An outage of
        the broker, Redis, the backend or the gateway is not one: the tasks that own
        those connections keep retrying, so a restart would fix nothing."""
        now = self._clock()
        out = []
        for sink, pending in sorted(self._pending.items()):
            last = max(self._last_progress.get(sink, now), self._last_attempt.get(sink, 0.0))
            if pending > 0 and now - last >= self.stall_timeout:
                out.append(f"{sink}: stuck, {pending} pending, no attempt for {now - last:.0f}s")
        out.extend(f"task {n} died: {e}" for n, e in sorted(self.dead.items()))
        return out

    @property
    def ready(self) -> bool:
        return not self.reasons()
