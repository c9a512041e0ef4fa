"""The opening of a new study: the recipes known to work, queued in two stages.

1. The probes of every pretrained candidate (whole backbone frozen, the converged logistic-regression
   head on cached features): the cheapest trials there are, and a measured estimate of how well each
   backbone's features fit this dataset. `stage-probe` reads the pooled output of every stage beside
   the final pooled features (multilevel.py), which serves targets far from the source far better;
   `probe` the final features alone, which are the last columns of the stage probe's (the caches
   hand them over: no second pass over the images). Every candidate's stage probe runs first, so
   a near-tie (selection.py) keeps the stage probe.
2. Once every queued probe has finished, the expensive recipes for the backbone whose probe scored
   best on val: `fine-tune` first (every allowed stage trained from a random head at a moderate lr:
   the recipe a person tries first, so the search has its result as early as that person would),
   then `lp-ft` (the head starts from that probe, the last half of the stages fine-tuned at a low lr;
   Kumar et al., ICLR 2022). A backbone whose probe is weak gets no expensive trial from the opening;
   the sampler, informed by every trial so far, spends the rest of the budget.

The learning rates are Adam's under the trainer's cosine schedule over `--epochs`: the fine-tune's is
the one that measured best over short schedules (benchmarks/results/issue16-recipes.csv), the
LP-FT's low enough not to undo the probe head it starts from.

With nothing to probe (only random-init candidates, or a space without a fully frozen linear trial)
the opening is every candidate's recipes at once, as there is nothing to rank them by.

Invariant: the queue lives in the study (`enqueue_trial`), never in a process. Stage 1 is queued by
the process that creates the study; stage 2 by whichever worker asks for a trial first once it is due,
marked in the study (`FOLLOW_UP_ATTR`), so a resumed study or a joining worker never queues it again.
Two workers racing to queue it queue the same parameters: the second enqueue finds them waiting and
skips them (`skip_if_exists`), and where both write at the same moment the worker's duplicate guard
fails the second copy without running it. Nothing is queued past `--trials`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import PROBE_C_CV, SearchConfig, parse_frozen_spec, resolve_stage
from .record import FOLLOW_UP_KEY, key

PORTFOLIO_ATTR = key("portfolio")  # on a queued opening trial: which recipe it is (KINDS)
FOLLOW_UP_ATTR = FOLLOW_UP_KEY  # on the study: the backbone stage 2 was queued for
LP_FT_LR, FT_LR = 1e-4, 3e-3  # the recipes' learning rates: low after a probe start, moderate from random
KINDS = ("stage-probe", "probe", "fine-tune", "lp-ft")  # the order they are queued in (see the module docstring)
PROBES = KINDS[:2]  # stage 1
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def recipes(config: SearchConfig, backbone: str, stages: int, pretrained: bool) -> dict[str, dict]:
    """The recipes known to work for one backbone, inside the configured space, in `KINDS` order (see the
    module docstring). A random-init backbone gets only the fine-tune: its probe and LP-FT start from
    noise. Recipes the space rules out (no linear head, no fully frozen value, ...) are left out."""
    optimizer = "adam" if "adam" in config.optimizers else config.optimizers[0]
    found: dict[str, dict] = {}
    linear = "linear" in config.heads
    if pretrained and linear:
        frozen = frozen_value(config, stages, stages)
        if resolved(frozen, stages) >= stages:
            for kind, features in zip(PROBES, ("stages", "final")):
                if features in config.features:
                    found[kind] = {"backbone": backbone, "frozen_stages": frozen, "features": features,
                                   "head": "linear", "probe_c": opening_c(config)}
        half = frozen_value(config, stages, stages // 2)
        if "probe" in config.head_inits and resolved(half, stages) < stages:
            found["lp-ft"] = {"backbone": backbone, "frozen_stages": half, "head": "linear", "head_init": "probe",
                              **lr_value(config, LP_FT_LR), "optimizer": optimizer}
    least = frozen_value(config, stages, 0)
    if resolved(least, stages) < stages:
        head = "linear" if linear else config.heads[0]
        recipe = {"backbone": backbone, "frozen_stages": least, "head": head}
        if head == "linear":
            recipe["head_init"] = "random" if "random" in config.head_inits else config.head_inits[0]
        else:
            recipe["head_hidden"] = config.head_hidden[0]
            if config.head_dropout[0] != config.head_dropout[1]:
                recipe["head_dropout"] = config.head_dropout[0]
        found["fine-tune"] = {**recipe, **lr_value(config, FT_LR), "optimizer": optimizer}
    return {kind: found[kind] for kind in KINDS if kind in found}


@dataclass(frozen=True)
class Opening:
    """The two-stage opening for `candidates` (the pre-ranked ones when --prerank kept a subset);
    `stages` and `pretrained` describe each candidate as created."""

    config: SearchConfig
    candidates: Sequence[str]
    stages: dict[str, int]
    pretrained: dict[str, bool]

    def recipes_of(self, backbone: str) -> dict[str, dict]:
        return recipes(self.config, backbone, self.stages[backbone], self.pretrained[backbone])

    def first(self) -> list[tuple[str, dict]]:
        """Stage 1: every pretrained candidate's probes; with none to probe, every candidate's recipes."""
        probes = [(kind, found[kind]) for kind in PROBES for name in self.candidates
                  if kind in (found := self.recipes_of(name))]
        if probes:
            return probes
        every = [(kind, found[kind]) for kind in KINDS for name in self.candidates
                 if kind in (found := self.recipes_of(name))]
        return every

    def follow_up(self, trials: Sequence[FrozenTrial]) -> tuple[str, list[tuple[str, dict]]] | None:
        """Stage 2, once due: (the backbone, its fine-tune and LP-FT). Due when the study's opening
        probes have all finished and at least one completed; the best by val wins, ties to the earlier
        trial. None while a probe is queued or running, or when no probe completed."""
        probes = [t for t in trials if t.user_attrs.get(PORTFOLIO_ATTR) in PROBES]
        if not probes or any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in probes):
            return None
        done = [t for t in probes if t.state == TrialState.COMPLETE and t.value is not None
                and t.params.get("backbone") in self.stages]
        if not done:
            return None
        best = max(done, key=lambda t: (t.value, -t.number)).params["backbone"]
        found = self.recipes_of(best)
        return best, [(kind, found[kind]) for kind in KINDS[len(PROBES):] if kind in found]

    def queue_first(self, study: optuna.Study) -> tuple[list[tuple[str, dict]], int]:
        """Queue stage 1 in a new study; returns what was queued (cut at --trials) and how many were cut."""
        wanted = self.first()
        queued = _enqueue(study, wanted, self.config.trials)
        return queued, len(wanted) - len(queued)

    def queue_due(self, study: optuna.Study) -> list[tuple[str, dict]]:
        """Queue stage 2 if it is due and not yet queued; returns what was queued."""
        if not self.config.portfolio or FOLLOW_UP_ATTR in study.user_attrs:
            return []
        trials = study.get_trials(deepcopy=False)
        due = self.follow_up(trials)
        if due is None:
            return []
        backbone, queue = due
        study.set_user_attr(FOLLOW_UP_ATTR, backbone)
        return _enqueue(study, queue, self.config.trials)


def _enqueue(study: optuna.Study, queue: list[tuple[str, dict]], budget: int | None) -> list[tuple[str, dict]]:
    if budget is not None:
        room = budget - len(study.get_trials(deepcopy=False, states=LIVE))
        queue = queue[:max(room, 0)]
    for kind, params in queue:
        study.enqueue_trial(params, user_attrs={PORTFOLIO_ATTR: kind}, skip_if_exists=True)
    return queue


def opening_c(config: SearchConfig) -> str:
    """The opening probes' C: chosen by cross-validation (as the benchmark's probe), when the space allows it."""
    return PROBE_C_CV if PROBE_C_CV in config.probe_cs else config.probe_cs[0]


def frozen_value(config: SearchConfig, stages: int, target: int) -> int | str:
    """The allowed frozen-stages value (as the space stores it) nearest to `target` (the first on a tie)."""
    mode, tokens = parse_frozen_spec(config.frozen_stages)
    if mode == "range":
        high = resolve_stage(tokens[1], stages)
        low = min(resolve_stage(tokens[0], stages), high)
        return min(max(target, low), high)
    return min(tokens, key=lambda t: abs(resolve_stage(t, stages) - target))


def resolved(value: int | str, stages: int) -> int:
    return value if isinstance(value, int) else resolve_stage(value, stages)


def lr_value(config: SearchConfig, target: float) -> dict:
    """`{"lr": target}` clipped to the configured range, or nothing when the range is one value (pinned)."""
    low, high = config.lr
    return {} if low == high else {"lr": min(max(target, low), high)}
