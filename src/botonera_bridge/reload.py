"""Configuration reload on SIGHUP (``systemctl reload``).

Re-reads the same file (and the environment) the bridge started with. Empresas,
contactos, central, escalation, WhatsApp templates and the log level apply at once
through :class:`config.Live`; a changed key that needs a restart (broker, Redis,
backend, status listener...) is logged as such and keeps its running value; an
invalid file is refused with the reason and the running configuration stays.
Nothing in flight is touched: queues, connections and tasks keep running.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from . import config
from .errors import ConfigError
from .metrics import Metrics

log = logging.getLogger(__name__)


def reload(live: config.Live, metrics: Metrics, env: Mapping[str, str] | None = None) -> bool:
    """One reload; True when the new configuration was applied. Never raises."""
    old = live.current
    try:
        new = config.load(None if old.source == "defaults" else old.source, env or os.environ)
    except ConfigError as exc:
        metrics.config_reloads.labels(result="refused").inc()
        log.error("config reload refused, the running configuration stays: %s", exc)
        return False
    kept = config.restart_needed(old, new)
    try:
        live.swap(config.merge_reload(old, new))
        logging.getLogger().setLevel(new.log.level)
    except Exception:  # a subscriber's bug must not end the process that runs the alarms
        metrics.config_reloads.labels(result="failed").inc()
        log.exception("config reload failed while applying it")
        return False
    metrics.config_reloads.labels(result="applied").inc()
    if kept:
        log.warning(
            "config reloaded from %s; these changes need a restart and keep their running "
            "value until then: %s",
            new.source,
            ", ".join(kept),
        )
    else:
        log.info("config reloaded from %s", new.source)
    empresas = ", ".join(f"{e.id}({len(e.contactos)})" for e in new.empresas if e.contactos)
    log.info("empresas with contactos: %s; central: %d", empresas or "none", len(new.central))
    return True
