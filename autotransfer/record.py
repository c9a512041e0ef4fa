"""What the study stores: every attribute key autotransfer writes to an Optuna study or trial, and the
typed record of one trial that the objective writes and the leaderboard and the benchmark read.

Invariant: no other module spells a key. A study attribute is one of the `*_KEY` constants below; a
trial attribute is a field of `TrialRecord`, written with `write` as the trial goes (so a trial whose
worker dies keeps what it had recorded) and read back whole with `TrialRecord.of` (an attribute never
written reads as the field's default). The sampled parameters are Optuna's own (`trial.params`); a
dimension a flag pinned is recorded here under its parameter name (`lr`, `head_dropout`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Protocol

INTERRUPTED = "interrupted"  # how the reason of a trial stopped by Ctrl-C or SIGTERM starts (worker.py)

# -- on the study
CONFIG_KEY = "autotransfer_config"  # the search's settings, which define the study (config.SearchConfig)
PRERANK_KEY = "autotransfer_prerank"  # --prerank's scores and the candidates it kept
TEST_KEY = "autotransfer_test"  # the chosen trial's test score, once taken (holdout.py)
ELAPSED_KEY = "autotransfer_elapsed_s"  # search seconds spent over all runs, for --timeout
FOLLOW_UP_KEY = "portfolio_follow_up"  # the backbone the opening's second stage was queued for


@dataclass(frozen=True)
class TrialRecord:
    """One trial's user attributes, as the objective, the worker loop and the retry logic write them."""

    reason: str = ""  # why it was pruned, failed or not run ("" when it completed)
    portfolio: str | None = None  # the opening recipe it was queued as: probe, fine-tune or lp-ft
    frozen_stages: int | None = None  # resolved ("all" stored as the number)
    num_stages: int | None = None
    pretrained: str | None = None  # the weights' label: pretrained, random, a file or checkpoint name
    weights_source: str | None = None  # where the weights came from, as the provider says
    image_size: int | None = None
    head_init: str | None = None  # random, or probe: the converged probe (fully frozen) or LP-FT's start
    probe_c: float | None = None  # the L2 strength of the probe: the trial's head, or the LP-FT head's start
    lr: float | None = None  # the learning rate when --lr pinned it (otherwise a sampled parameter)
    head_dropout: float | None = None  # the MLP head's dropout when --head-dropout pinned it
    trainable_params: int | None = None
    total_params: int | None = None
    epochs_done: int | None = None
    cache: str | None = None  # the path it trained on: features, boundary or plain (cache/plan.py)
    cache_note: str | None = None  # what the caches planned, then what they did
    duration_s: float | None = None  # the objective's own time, from model creation to the last epoch
    worker: str | None = None  # host:pid of the process running it; marks trials that send heartbeats
    checkpoint_key: int | None = None  # the first run's number: retried copies share its checkpoints
    resumed_from_epoch: int | None = None  # a retry that continued from a checkpoint
    oom_retry: str | None = None  # the out-of-memory retry's smaller micro-batches

    @classmethod
    def of(cls, trial: Any) -> TrialRecord:
        """The record of a trial (a FrozenTrial, or anything with `user_attrs`)."""
        return cls.from_attrs(trial.user_attrs)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> TrialRecord:
        return cls(**{name: attrs[name] for name in FIELDS if name in attrs})


FIELDS = tuple(field.name for field in fields(TrialRecord))


class _Writable(Protocol):
    def set_user_attr(self, key: str, value: Any) -> None: ...


def write(trial: _Writable, **values: Any) -> None:
    """Record `values` on a running trial, one user attribute per TrialRecord field named."""
    unknown = [name for name in values if name not in FIELDS]
    if unknown:
        raise KeyError(f"not a TrialRecord field: {', '.join(unknown)}")
    for name, value in values.items():
        trial.set_user_attr(name, value)


def key(name: str) -> str:
    """A TrialRecord field's attribute key, checked: for code that reads the raw `user_attrs` of
    many trials at once, or hands Optuna a user-attrs dict (`enqueue_trial`)."""
    if name not in FIELDS:
        raise KeyError(f"not a TrialRecord field: {name}")
    return name
