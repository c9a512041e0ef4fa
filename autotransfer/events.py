"""Trial lifecycle events, delivered to every plugin that implements the lifecycle hooks.

Each implementation is called on its own: a notifier that raises (a full disk, a dead
webhook) is reported once as a warning and skipped, and neither the trial nor the other
plugins' callbacks are affected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialEvent:
    """Which trial an event is about; `params` are the drawn values (backbone, lr, ...)."""

    study_name: str
    storage: str
    number: int
    params: dict[str, Any]
    out: Path


@dataclass
class Lifecycle:
    """Calls the lifecycle hooks of a plugin manager, isolating each implementation."""

    pm: pluggy.PluginManager
    _warned: set[tuple[str, str]] = field(default_factory=set)

    def trial_started(self, trial: TrialEvent) -> None:
        self._call("autotransfer_trial_started", trial=trial)

    def epoch_ended(self, trial: TrialEvent, epoch: Any) -> None:
        self._call("autotransfer_epoch_ended", trial=trial, epoch=epoch)

    def trial_finished(self, trial: TrialEvent, state: str, value: float | None, reason: str | None) -> None:
        self._call("autotransfer_trial_finished", trial=trial, state=state, value=value, reason=reason)

    def _call(self, hook_name: str, **kwargs: Any) -> None:
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception as exc:  # a callback must never fail the trial it observes
                key = (impl.plugin_name, hook_name)
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("plugin %r failed in %s: %s: %s (further failures of this hook are not shown)",
                                impl.plugin_name, hook_name, type(exc).__name__, exc)
