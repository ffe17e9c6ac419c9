"""Per-number digests: what waits for one number, ranked and rendered as one message.

WhatsApp allows one message every ~6 s to one person, so everything that queues
for a number while it waits for its next slot is sent together. This module is
pure (no I/O, no clock): the sink decides *when*, this decides *what*.

* :func:`rank` orders by urgency: ``alarmas`` and semáforos ROJO/AZUL (and the
  sink's direct texts: escalations, replies) first, then other semáforos, then
  panel offline/online and repeat summaries.
* :class:`Notice` is one line of a digest: one event, or identical repeats of it
  (``×N``), or a direct text. ``carried`` holds whatever the sink tracks per
  notice (outbox entries, direct texts); it is opaque here.
* :func:`render` builds the text: a lone notice keeps its full single form; a
  watchdog offline/online burst of one empresa becomes one panels line; anything
  more becomes a header plus up to :data:`MAX_LINES` lines, then "y N más".
  Texts are ≤ 4,096 characters, template parameters one line ≤ 1,024.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from ..config import Empresa
from ..messages import Event
from . import texts

URGENT: Final = 0  # alarmas, semáforos ROJO/AZUL, direct texts
SEMAFORO: Final = 1  # other semáforos
STATUS: Final = 2  # estado offline/online, repeat summaries
MAX_LINES: Final = 10  # lines of one digest before "y N más"
MAX_LINE: Final = 300  # characters of one event's detail inside a digest
_URGENT_COLOURS: Final = frozenset({"ROJO", "AZUL"})

RepeatKey = tuple[str, ...]


def rank(event: Event) -> int:
    if event.tipo == "alarmas":
        return URGENT
    if event.tipo == "semaforos":
        _, colour, _ = texts.semaforo(event.detail.get("tipo_alarma", ""))
        return URGENT if colour in _URGENT_COLOURS else SEMAFORO
    return STATUS


def repeat_key(event: Event) -> RepeatKey | None:
    """What makes two events identical repeats (counted, not repeated); None: never merged."""
    if event.prueba:
        return None
    d = event.detail
    if event.tipo in ("alarmas", "semaforos"):
        return (
            event.tipo,
            event.empresa,
            event.sede,
            d.get("tipo_alarma", ""),
            d.get("descripcion", ""),
        )
    if event.tipo == "estado":
        return (event.tipo, event.empresa, event.sede, event.dispositivo, d.get("status", ""))
    return None


@dataclass(eq=False)
class Notice:
    """One line of a digest; see the module docstring."""

    rank: int
    seq: int  # arrival order, breaks ties within a rank
    key: RepeatKey | None = None
    event: Event | None = None  # None for a direct text
    empresa: Empresa | None = None
    text: str = ""  # direct text
    summary: bool = False  # repeats of something already sent ("se repitió N veces más")
    count: int = 0
    first_at: float = 0.0  # sink clock of the first event carried
    last_ns: int = 0  # wall clock of the newest event carried
    carried: list[Any] = field(default_factory=list)

    def add(self, item: Any, at: float, received_ns: int) -> None:
        if not self.count:
            self.first_at = at
        self.count += 1
        self.last_ns = max(self.last_ns, received_ns)
        self.carried.append(item)

    @property
    def watchdog_state(self) -> tuple[str, str] | None:
        """(empresa, status) of a watchdog offline/online notice: these group by empresa."""
        e = self.event
        if e is None or self.summary or e.tipo != "estado" or e.origen != "watchdog":
            return None
        return e.empresa, e.detail.get("status", "")


class Rendered(NamedTuple):
    text: str
    params: tuple[str, str, str] | None  # template body parameters; None: plain text
    kind: str  # alert | summary | direct | digest (the whatsapp_sent metric label)


class _Line(NamedTuple):
    notices: list[Notice]

    @property
    def head(self) -> Notice:
        return self.notices[0]


def _lines(notices: Sequence[Notice]) -> list[_Line]:
    """Ranked lines; watchdog notices of one empresa and state share one line."""
    lines: list[_Line] = []
    groups: dict[tuple[str, str], _Line] = {}
    for notice in sorted(notices, key=lambda n: (n.rank, n.seq)):
        state = notice.watchdog_state
        if state is not None and state in groups:
            groups[state].notices.append(notice)
            continue
        line = _Line([notice])
        if state is not None:
            groups[state] = line
        lines.append(line)
    return lines


def _single(line: _Line, *, with_empresa: bool = True, short: bool = False) -> str:
    """The text of one line: full form (a message of its own) or short (inside a digest)."""
    n = line.head
    if n.event is None:
        return n.text
    if len(line.notices) > 1:
        return texts.panels_text([m.event for m in line.notices if m.event], n.empresa)
    if n.summary:
        return texts.summary_text(n.event, n.empresa, n.count, last_ns=n.last_ns)
    if short:
        return texts.line_text(
            n.event, n.empresa, count=n.count, with_empresa=with_empresa, limit=MAX_LINE
        )
    span = max(0.0, (n.last_ns - n.event.received_ns) / 1e9)
    return texts.event_text(n.event, n.empresa, count=n.count, span_seconds=span)


def _params(line: _Line) -> tuple[str, str, str] | None:
    n = line.head
    if n.event is None:
        return None
    if len(line.notices) > 1:  # '📴 12 paneles sin conexión — Cota: a, b · 14:32'
        head, _, rest = _single(line).partition(" — ")
        _, _, detail = rest.partition(": ")
        return _clip_params((texts.empresa_name(n.event.empresa, n.empresa), head, detail))
    if n.summary:  # '… · se repitió 3 veces más (hasta 14:33)'
        where, what, _ = texts.template_params(n.event, n.empresa)
        return _clip_params((where, what, _single(line).rsplit(" · ", 1)[-1]))
    span = max(0.0, (n.last_ns - n.event.received_ns) / 1e9)
    return _clip_params(texts.template_params(n.event, n.empresa, count=n.count, span_seconds=span))


def _clip_params(params: tuple[str, str, str]) -> tuple[str, str, str]:
    a, b, c = params
    return texts.one_line(a), texts.one_line(b), texts.one_line(c)


def render(notices: Sequence[Notice]) -> Rendered:
    """The one message carrying ``notices`` (at least one)."""
    lines = _lines(notices)
    if len(lines) == 1:
        line = lines[0]
        n = line.head
        kind = "direct" if n.event is None else "summary" if n.summary else "alert"
        return Rendered(texts.clip(_single(line)), _params(line), kind)
    names = list(
        dict.fromkeys(texts.empresa_name(n.event.empresa, n.empresa) for n in notices if n.event)
    )
    one_empresa = len(names) == 1
    shown = lines[:MAX_LINES]
    body = [_single(line, with_empresa=not one_empresa, short=True) for line in shown]
    if len(lines) > len(shown):
        body.append(texts.more_text(len(lines) - len(shown)))
    total = sum(n.count or 1 for n in notices)
    alerts = all(n.event is not None and n.event.tipo in ("alarmas", "semaforos") for n in notices)
    head = lines[0].head
    emoji = texts.headline(head.event)[0] if head.event is not None else "⚠️"
    header = texts.digest_header(emoji, total, "alertas" if alerts else "avisos", names)
    if all(n.event is not None and n.event.prueba for n in notices):
        header = f"{texts.PRUEBA} {header}"
    text = texts.clip("\n".join([header, *body]))
    params = None
    if any(n.event is not None for n in notices):
        where = ", ".join(names) or "varias"
        params = _clip_params((where, header.split(" — ", 1)[0], " · ".join(body)))
    return Rendered(text, params, "digest")
