"""High availability by session adoption: a replica that dies (or hangs) hands its
MQTT session to a live one within seconds, on any MQTT 3.1.1 broker.

Why adoption and not active/standby: with ``mqtt.shared_group`` every replica works
(the load is shared), and mosquitto keeps queueing a dead member's share into its
persistent session; only a client connecting with that client_id gets it. So each
session is guarded by a lease, and a live replica takes over the lease *and* the
session of a replica that stopped renewing.

Keys (``redis.prefix`` = P):

- ``P:replicas`` — hash: client_id -> epoch counter (every session ever seen).
- ``P:replicas:<client_id>`` — the session lease, ``"<holder> <epoch> <instance>"`` with
  a TTL of ``ha.lease``; the holder renews it every ``interval`` (lease/5, ≤ 2 s).
- ``P:replicas:<client_id>:want`` — set by a returning owner: "give my session back".

The lease value is also the **fencing token**: every outbox append made for messages
of a session runs under it (``streams.Fence``; the append script refuses everything
when the key no longer holds the token), so a replica that was frozen (SIGSTOP, a hung
VM) and resumes after its session was adopted appends nothing. Without Redis the
local check :meth:`Lease.valid` refuses once the event loop was seen stalled for half
a lease (a freeze) until Redis confirms the lease again.

Rules:

- A replica connects its own session only while it holds its own lease
  (:meth:`Replicas.own_gate`); at start it claims it (a previous incarnation's lease is
  taken over at once with a new epoch), or, when another replica adopted it, asks for
  it back and waits for the hand-back.
- A session is adopted only after its lease was seen *absent* by successful Redis reads
  for ``ADOPT_AFTER_ROUNDS`` rounds in a row: a lease that merely could not be read
  (Redis down, a timeout) never causes a takeover, and an owner coming back with
  Redis gets a round to reclaim its lease first. The claim is atomic: one adopter.
- The adopter keeps the adopted session connected (mosquitto keeps feeding it) and
  processes it through the same safe path (outbox append under the lease, then
  PUBACK) until the owner asks for it back: then it stops reading, lets what it took
  be appended and acknowledged, disconnects cleanly and releases the lease.
- A replica that cannot reach Redis adopts nothing. If it keeps its broker connection
  it keeps working (memory fallback) until an adopter's connection takes the session
  over at the broker; it does not reconnect until it holds its lease again, so two
  replicas never process one session.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import trio

from ..config import Settings
from ..errors import RedisError
from ..health import Health
from ..metrics import Metrics
from ..queues.redis_client import Redis
from ..queues.state import HashStore
from ..queues.streams import DurableStream
from ..watch.alarms import AlarmBook
from ..watch.receipts import Timelines
from .mqtt import INTAKE_BUFFER, MqttClient, MqttMessage, open_mqtt
from .router import Router

log = logging.getLogger(__name__)

ADOPT_AFTER_ROUNDS: Final = 2  # successful reads seeing a lease absent before adopting it
MAX_SESSIONS: Final = 64  # replicas looked at per round (bounds the scan)
MAX_ADOPTED: Final = 16  # sessions one replica adopts at most
HANDBACK_DRAIN: Final = 5.0  # seconds to finish what an adopted session took, on hand-back
RELEASE_TIMEOUT: Final = 2.0  # seconds for the release of a lease on the way out
TAKEOVER_HOOK_TIMEOUT: Final = 30.0  # seconds to take over a dead replica's queued work

# KEYS: lease, registry, want. ARGV: client_id, instance, lease_ms, reuse token.
# Returns {1, token} when this replica holds its own lease, {0, current holder} otherwise
# (and sets "want" so the adopter gives it back).
_CLAIM_OWN: Final = """
local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[4] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('DEL', KEYS[3])
  return {1, cur}
end
if not cur and ARGV[4] ~= '' then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
  redis.call('DEL', KEYS[3])
  return {1, ARGV[4]}
end
if cur and string.match(cur, '^(%S+)') ~= ARGV[1] then
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
  return {0, cur}
end
local epoch = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
local token = ARGV[1] .. ' ' .. epoch .. ' ' .. ARGV[2]
redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
redis.call('DEL', KEYS[3])
return {1, token}
"""

# KEYS: lease, registry. ARGV: session client_id, adopter client_id, instance, lease_ms.
_CLAIM_ADOPT: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local epoch = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
local token = ARGV[2] .. ' ' .. epoch .. ' ' .. ARGV[3]
redis.call('SET', KEYS[1], token, 'PX', ARGV[4])
return token
"""

# KEYS: lease, want. ARGV: token, lease_ms. 0 lost, 1 renewed, 2 renewed but wanted back.
_RENEW: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
return 1
"""

# KEYS: lease. ARGV: token.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def interval_for(lease: float) -> float:
    """Seconds between two lease rounds: five renewals per lease, at most 2 s apart."""
    return min(2.0, max(0.2, lease / 5))


async def take_over(
    replica: str,
    *,
    streams: Sequence[DurableStream],
    book: AlarmBook,
    alarms: HashStore,
    timelines: Timelines,
) -> None:
    """After adopting a dead replica's MQTT session: take its pending entries of
    ``streams`` (the outbox and the inbox) now, not after ``redis.reclaim_idle``, and
    the open alarms (with their escalation state) it wrote to Redis; this replica's
    own board entries win."""
    for stream in streams:
        try:
            await stream.take_over(replica)
        except RedisError as exc:  # maintenance reclaims them later anyway
            log.warning("cannot take over %s entries of %s: %s", stream.key, replica, exc)
    await book.flush()
    await alarms.load()
    book.reload()
    timelines.reload()


class Lease:
    """One MQTT session's lease as this replica holds it; a ``streams.Fence``."""

    def __init__(self, session: str, key: str, coordinator: Replicas) -> None:
        self.session = session
        self.key = key
        self.token = ""  # empty: not held
        self.confirmed_at = -math.inf  # trio time Redis last confirmed the token
        self.refusals = 0  # batches the fence refused since the last check (see refused)
        self._coordinator = coordinator

    def valid(self) -> bool:
        """Held, and the event loop has not been frozen since Redis last confirmed it."""
        return bool(self.token) and not self._coordinator.stalled()

    def refused(self) -> None:
        """Messages of this session were dropped unacknowledged. If the lease turns out to
        be still ours (the loop only stalled), the connection is dropped so that the broker
        redelivers them; otherwise the adopter has them."""
        self.refusals += 1

    def fresh(self) -> bool:
        """Confirmed so recently that nobody can have adopted the session since: it cannot
        have expired yet. Needed to (re)connect a session to the broker, because a new
        connection takes the session over there."""
        c = self._coordinator
        return self.valid() and trio.current_time() - self.confirmed_at < c.lease_s - c.interval

    @property
    def epoch(self) -> int:
        parts = self.token.split(" ")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


class _Adoption:
    __slots__ = ("client", "lease", "lost", "stop", "wanted")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.client: MqttClient | None = None
        self.stop = trio.Event()
        self.wanted = False  # the owner asked for it back: hand over gracefully
        self.lost = False  # the lease is gone: stop at once


class Replicas:
    """The lease loop: renew our own lease, watch the others, adopt silent ones."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        *,
        make_router: Callable[[Lease], Router],
        on_takeover: Callable[[str], Awaitable[None]] | None = None,
        health: Health | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._make_router = make_router
        self._on_takeover = on_takeover
        self._health = health
        self._metrics = metrics
        self.me = settings.mqtt.client_id
        self.lease_s = settings.ha.lease
        self.interval = interval_for(self.lease_s)
        self._lease_ms = int(self.lease_s * 1000)
        self._stall_after = max(self.lease_s / 2, 1.0)
        self._round_timeout = max(1.0, self.interval)
        self.prefix = f"{settings.redis.prefix}:replicas"
        self.instance = os.urandom(6).hex()  # tells this process from an earlier one
        self.own = Lease(self.me, self._key(self.me), self)
        self.own_mqtt: MqttClient | None = None  # this replica's own session (run)
        self._own_changed = trio.Event()  # replaced after every round and every change
        self._own_holder = ""  # who holds our lease while we wait for it
        self._adopted: dict[str, _Adoption] = {}
        self._absent_since: dict[str, float] = {}
        self._last_tick = trio.current_time()
        self._suspect = False  # a freeze was seen: leases unconfirmed until the next round
        self._view: dict[str, dict[str, Any]] = {}
        self._last_ok: float | None = None
        self._last_error = ""
        if health is not None:
            health.require("ha")
            health.set("ha", False, "claiming this replica's MQTT session lease")

    def _key(self, client_id: str) -> str:
        return f"{self.prefix}:{client_id}"

    # -- what the rest of the bridge uses ------------------------------------------------
    def stalled(self) -> bool:
        """The event loop did not run for half a lease (frozen, e.g. SIGSTOP), or did and
        Redis has not confirmed our leases since: someone may have adopted our sessions."""
        return self._suspect or trio.current_time() - self._last_tick > self._stall_after

    async def own_gate(self) -> None:
        """Return once this replica holds its own session's lease, freshly confirmed
        (MqttClient.gate): after losing Redis, a replica whose broker connection broke
        does not reconnect (and take the session back from an adopter) blindly."""
        while not self.own.fresh():
            await self._own_changed.wait()

    def snapshot(self) -> dict[str, Any]:
        """For /api/status: every known session, its lease and who holds it."""
        return {
            "enabled": True,
            "self": self.me,
            "lease_s": self.lease_s,
            "own_lease": "held" if self.own.valid() else (self._own_holder or "not held"),
            "epoch": self.own.epoch,
            "adopted": sorted(self._adopted),
            "last_round_ok_s_ago": (
                round(trio.current_time() - self._last_ok, 1) if self._last_ok is not None else None
            ),
            "last_error": self._last_error,
            "replicas": [self._view[c] for c in sorted(self._view)],
        }

    # -- the loop ------------------------------------------------------------------------
    async def run(
        self,
        own_mqtt: MqttClient | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The lease rounds; ``own_mqtt``: this replica's own session, dropped when its
        lease is lost (its gate is :meth:`own_gate`)."""
        self.own_mqtt = own_mqtt
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ticker)
            task_status.started()
            while True:
                try:
                    with trio.fail_after(self._round_timeout):
                        await self._round(nursery)
                except (RedisError, trio.TooSlowError, ValueError, IndexError) as exc:
                    # (ValueError, IndexError: a reply of an unexpected shape)
                    self._absent_since.clear()  # unreadable is not absent
                    why = str(exc) or "timed out"
                    # once per outage: the reason's wording changes from round to round
                    level = logging.DEBUG if self._last_error else logging.WARNING
                    log.log(level, "HA: cannot read the replicas' leases: %s", why)
                    self._last_error = why
                else:
                    if self._last_error:
                        log.info("HA: leases readable again")
                    self._last_error = ""
                    self._last_ok = trio.current_time()
                self._report()
                await trio.sleep(self.interval)

    async def _ticker(self) -> None:
        step = self._stall_after / 4
        while True:
            now = trio.current_time()
            if now - self._last_tick > self._stall_after and not self._suspect:
                log.warning(
                    "HA: the event loop did not run for %.1fs (process frozen?): nothing is "
                    "processed until Redis confirms this replica still holds its sessions",
                    now - self._last_tick,
                )
                self._suspect = True
            self._last_tick = now
            await trio.sleep(step)

    async def _round(self, nursery: trio.Nursery) -> None:
        suspect = self._suspect
        await self._keep_own(suspect)
        await self._keep_adopted()
        self._redeliver_refused()
        if suspect:
            self._suspect = False  # every lease we hold was checked in this round
        self._changed_own()  # gates re-check freshness
        await self._scan(nursery)

    async def _keep_own(self, suspect: bool) -> None:
        r = self._redis
        own = self.own
        if own.token:
            got = await r.execute("EVAL", _RENEW, 2, own.key, f"{own.key}:want", own.token,
                                  self._lease_ms)  # fmt: skip
            if int(got) != 0:
                own.confirmed_at = trio.current_time()
                return
        before = own.token
        # After a freeze our lease may have been adopted and given up again meanwhile:
        # never reuse the old token then (its holder's appends would pass the fence).
        reuse = "" if suspect else own.token
        ok, value = await r.execute(
            "EVAL", _CLAIM_OWN, 3, own.key, self.prefix, f"{own.key}:want",
            self.me, self.instance, self._lease_ms, reuse,
        )  # fmt: skip
        value = value.decode()
        if int(ok):
            own.token = value
            own.confirmed_at = trio.current_time()
            if value != before:
                if before and self.own_mqtt is not None:
                    # Messages taken under the old token are refused by the fence; a new
                    # connection makes the broker redeliver them.
                    self.own_mqtt.drop("this replica's session lease was renewed with a new epoch")
                log.info("HA: holding the MQTT session lease of %r (epoch %d)", self.me, own.epoch)
            if self._own_holder:
                log.warning(
                    "HA: got this replica's MQTT session back from %s", self._own_holder.split()[0]
                )
            self._own_holder = ""
            self._changed_own()
            return
        holder = value.split(" ")[0]
        if own.token or not self._own_holder:
            if self._metrics is not None and own.token:
                self._metrics.ha_lease_lost.inc()
            log.warning(
                "HA: the MQTT session of %r is held by %s: not processing it, asked for it back",
                self.me,
                holder,
            )
        own.token = ""
        self._own_holder = value
        if self.own_mqtt is not None:
            self.own_mqtt.drop(f"the session lease is held by {holder}")
        self._changed_own()

    def _redeliver_refused(self) -> None:
        """Leases confirmed ours in this round whose fence refused messages meanwhile: those
        messages sit unacknowledged on a live connection; a new one gets them again."""
        sessions = [(self.own, self.own_mqtt)]
        sessions += [(a.lease, a.client) for a in self._adopted.values()]
        for lease, client in sessions:
            if lease.refusals and lease.token:
                lease.refusals = 0
                if client is not None:
                    client.drop("messages were refused while the lease was unconfirmed")

    def _changed_own(self) -> None:
        self._own_changed.set()
        self._own_changed = trio.Event()

    async def _keep_adopted(self) -> None:
        if not self._adopted:
            return
        items = [a for a in self._adopted.values() if a.lease.token]  # (renewed while handing back)
        if not items:
            return
        replies = await self._redis.pipeline(
            [["EVAL", _RENEW, 2, a.lease.key, f"{a.lease.key}:want", a.lease.token,
              self._lease_ms] for a in items]
        )  # fmt: skip
        for a, reply in zip(items, replies, strict=True):
            if isinstance(reply, RedisError):
                raise reply
            if int(reply) == 0:
                log.warning(
                    "HA: lost the lease of adopted session %r: stopping it", a.lease.session
                )
                if self._metrics is not None:
                    self._metrics.ha_lease_lost.inc()
                a.lost = True
                a.lease.token = ""
                a.stop.set()
            else:
                a.lease.confirmed_at = trio.current_time()
            if int(reply) == 2 and not a.wanted:
                log.info("HA: replica %r wants its MQTT session back: handing it over",
                         a.lease.session)  # fmt: skip
                a.wanted = True
                a.stop.set()

    async def _scan(self, nursery: trio.Nursery) -> None:
        r = self._redis
        sessions = [s.decode() for s in (await r.execute("HKEYS", self.prefix))[:MAX_SESSIONS]]
        replies = await r.pipeline(
            [cmd for s in sessions for cmd in (["GET", self._key(s)], ["PTTL", self._key(s)])]
        )
        now = trio.current_time()
        view: dict[str, dict[str, Any]] = {}
        candidates = []
        for i, session in enumerate(sessions):
            value, pttl = replies[2 * i], replies[2 * i + 1]
            if isinstance(value, RedisError):
                raise value
            if value is not None:
                holder, _, rest = value.decode().partition(" ")
                epoch = rest.split(" ")[0]
                self._absent_since.pop(session, None)
                view[session] = {
                    "client_id": session,
                    "holder": holder,
                    "epoch": int(epoch) if epoch.isdigit() else 0,
                    "lease_left_s": round(max(int(pttl), 0) / 1000, 1)
                    if isinstance(pttl, int)
                    else None,
                    "adopted_by": holder if holder != session else None,
                }
                continue
            view[session] = {"client_id": session, "holder": None, "epoch": None,
                             "lease_left_s": 0, "adopted_by": None}  # fmt: skip
            if session == self.me or session in self._adopted:
                continue
            since = self._absent_since.setdefault(session, now)
            if now - since >= (ADOPT_AFTER_ROUNDS - 0.5) * self.interval:
                candidates.append(session)
        self._view = view
        if not candidates or not self.own.valid():
            return  # a replica that does not hold its own session adopts nothing
        for session in candidates:
            if len(self._adopted) >= MAX_ADOPTED:
                log.warning("HA: already adopted %d sessions; %r left alone", MAX_ADOPTED,
                            session)  # fmt: skip
                return
            await self._adopt(nursery, session)

    async def _adopt(self, nursery: trio.Nursery, session: str) -> None:
        key = self._key(session)
        token = await self._redis.execute(
            "EVAL", _CLAIM_ADOPT, 2, key, self.prefix, session, self.me, self.instance,
            self._lease_ms,
        )  # fmt: skip
        self._absent_since.pop(session, None)
        if token is None:
            return  # its owner came back, or another replica was faster
        lease = Lease(session, key, self)
        lease.token = token.decode()
        lease.confirmed_at = trio.current_time()
        adoption = self._adopted[session] = _Adoption(lease)
        log.warning(
            "HA takeover: replica %r stopped renewing its lease (ha.lease %.1fs); %r adopts "
            "its MQTT session (epoch %d)",
            session,
            self.lease_s,
            self.me,
            lease.epoch,
        )
        if self._metrics is not None:
            self._metrics.ha_takeovers.labels(replica=session).inc()
        self._view[session] = {"client_id": session, "holder": self.me, "epoch": lease.epoch,
                               "lease_left_s": self.lease_s, "adopted_by": self.me}  # fmt: skip
        nursery.start_soon(self._run_adopted, adoption)
        if self._on_takeover is not None:
            nursery.start_soon(self._took_over, self._on_takeover, session)

    @staticmethod
    async def _took_over(hook: Callable[[str], Awaitable[None]], session: str) -> None:
        try:
            with trio.move_on_after(TAKEOVER_HOOK_TIMEOUT):
                await hook(session)
        except Exception:  # the adoption itself goes on; maintenance reclaims the rest
            log.exception("HA: taking over the queued work of %r failed", session)

    async def _run_adopted(self, adoption: _Adoption) -> None:
        lease = adoption.lease
        session = lease.session
        try:
            async with open_mqtt(
                self._settings.mqtt,
                client_id=session,
                status_topic=False,
                gate=self._adopted_gate(adoption),
            ) as c:
                adoption.client = c
                router = self._make_router(lease)
                send, recv = trio.open_memory_channel[MqttMessage](INTAKE_BUFFER)
                async with trio.open_nursery() as n:
                    await n.start(router.run, recv, c)
                    n.start_soon(c.run, send)
                    await adoption.stop.wait()
                    if adoption.wanted and not adoption.lost:
                        with trio.move_on_after(HANDBACK_DRAIN):
                            await c.quiesce()
                    n.cancel_scope.cancel()
            # open_mqtt's exit disconnected cleanly: now the owner may have it.
        except Exception:  # a bug here must not take this replica's own work down
            log.exception("HA: the adopted MQTT session of %r failed", session)
        finally:
            del self._adopted[session]
            if lease.token:
                with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
                    try:
                        await self._redis.execute("EVAL", _RELEASE, 1, lease.key, lease.token)
                    except RedisError as exc:
                        log.warning("HA: cannot release the lease of %r: %s", session, exc)
                lease.token = ""
            if adoption.wanted and self._metrics is not None:
                self._metrics.ha_handbacks.labels(replica=session).inc()
            log.warning("HA: stopped processing the adopted MQTT session of %r%s", session,
                        " (given back)" if adoption.wanted else "")  # fmt: skip
            self._report()

    def _adopted_gate(self, adoption: _Adoption) -> Callable[[], Awaitable[None]]:
        async def gate() -> None:
            while not adoption.lease.fresh():
                if not adoption.lease.token:
                    adoption.stop.set()
                    await trio.sleep_forever()
                await self._own_changed.wait()

        return gate

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.ha_sessions.labels(role="own").set(1 if self.own.valid() else 0)
            self._metrics.ha_sessions.labels(role="adopted").set(len(self._adopted))
        if self._health is not None:
            if self.own.token:
                self._health.set("ha", True)
            elif self._own_holder:
                holder = self._own_holder.split(" ")[0]
                self._health.set(
                    "ha", False, f"waiting for this replica's MQTT session, held by {holder}"
                )
            else:
                self._health.set("ha", False, "this replica's MQTT session lease is not held yet")
