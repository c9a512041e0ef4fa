"""The search space, define-by-run: each dimension is an Optuna suggestion a flag can restrict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import optuna

from .config import PROBE_C_CV, SearchConfig, parse_frozen_spec, probe_c_value, resolve_stage
from .heads import HeadConfig
from .portfolio import frozen_value, lr_value, resolved
from .record import write


@dataclass(frozen=True)
class TrialParams:
    backbone: str
    frozen_stages: int
    num_stages: int
    head: HeadConfig
    lr: float
    optimizer: str
    head_init: str = "random"  # "probe": the linear head starts from the frozen backbone's probe (LP-FT)
    features: str = "final"  # a fully frozen trial's head reads the final features or every stage's (multilevel.py)
    probe_c: float | None = None  # a probe's L2 strength; None: chosen by cross-validation on train (probe.py)

    @property
    def probe(self) -> bool:
        """Whole backbone frozen, linear head: the head is the converged probe; no lr, no optimizer."""
        return self.frozen_stages >= self.num_stages and self.head.kind == "linear"


PROBE_OPTIMIZER = "lbfgs"  # what a probe trial's head is solved with (recorded, not sampled)


def suggest(trial: optuna.Trial, config: SearchConfig, num_stages: Callable[[str], int],
            backbones: list[str] | None = None) -> TrialParams:
    """Sample one configuration; `num_stages(backbone)` bounds how deep it may be frozen, and
    `backbones` (the pre-ranked top k) may narrow the candidates."""
    backbone = trial.suggest_categorical("backbone", backbones or config.backbones)
    stages = num_stages(backbone)
    mode, tokens = parse_frozen_spec(config.frozen_stages)
    if mode == "range":
        high = resolve_stage(tokens[1], stages)
        low = min(resolve_stage(tokens[0], stages), high)
        frozen = trial.suggest_int("frozen_stages", low, high)
    else:
        frozen = resolve_stage(trial.suggest_categorical("frozen_stages", tokens), stages)
    features = "final"
    if frozen >= stages:  # drawn before the head, so ProbeOnce knows which probe a linear head would repeat
        features = trial.suggest_categorical("features", config.features)
    kind = trial.suggest_categorical("head", config.heads)
    head = HeadConfig(kind)
    if frozen >= stages and kind == "linear":  # the probe: nothing to choose but its L2 strength
        probe_c = probe_c_value(trial.suggest_categorical("probe_c", config.probe_cs))
        return TrialParams(backbone, frozen, stages, head, 0.0, PROBE_OPTIMIZER, "probe", features, probe_c)
    head_init = "random"
    if kind == "mlp":
        hidden = trial.suggest_categorical("head_hidden", config.head_hidden)
        head = HeadConfig(kind, hidden, _suggest_float(trial, "head_dropout", config.head_dropout))
    elif frozen < stages:
        head_init = trial.suggest_categorical("head_init", config.head_inits)
    lr = _suggest_float(trial, "lr", config.lr, log=True)
    optimizer = trial.suggest_categorical("optimizer", config.optimizers)
    return TrialParams(backbone, frozen, stages, head, lr, optimizer, head_init, features)


def _suggest_float(trial: optuna.Trial, name: str, bounds: tuple[float, float], log: bool = False) -> float:
    low, high = bounds
    if low == high:  # a dimension pinned by a flag is still recorded, as a fixed value
        write(trial, **{name: low})
        return low
    return trial.suggest_float(name, low, high, log=log)


def first_trial(config: SearchConfig, backbone: str, stages: int) -> dict:
    """A sensible opening trial for a backbone, inside the configured space: train the last stage
    and a linear head with Adam at 1e-3 (the nearest allowed values where the space says otherwise)."""
    params: dict = {"backbone": backbone, "frozen_stages": frozen_value(config, stages, max(stages - 1, 0))}
    params["head"] = "linear" if "linear" in config.heads else config.heads[0]
    if params["head"] == "mlp":
        params["head_hidden"] = config.head_hidden[0]
        if config.head_dropout[0] != config.head_dropout[1]:
            params["head_dropout"] = config.head_dropout[0]
    params.update(lr_value(config, 1e-3))
    params["optimizer"] = "adam" if "adam" in config.optimizers else config.optimizers[0]
    return params


class ProbeOnce(optuna.samplers.BaseSampler):
    """A sampler wrapper that never draws a backbone's probe (whole backbone frozen, linear head, one
    kind of features, one C) again once it is finished, running or queued. A probe is deterministic,
    so a repeat is an exact duplicate the search would only skip, and TPE keeps proposing it when it
    scores well. The draws that would repeat one are replaced: the C by another allowed C not taken,
    the features by another allowed kind with a C not taken (when the head can only be linear), the
    head by another allowed head, or, with only a linear head allowed, the frozen depth by another
    allowed depth. Everything else is the wrapped sampler's."""

    def __init__(self, base: optuna.samplers.BaseSampler, config: SearchConfig, num_stages: dict[str, int]):
        self.base, self.config, self.num_stages = base, config, num_stages

    # -- the wrapped sampler
    def infer_relative_search_space(self, study, trial):
        return self.base.infer_relative_search_space(study, trial)

    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def _known(self, name: str, *sources: dict):
        """A parameter's value so far; a single-choice one (never sampled, so absent in samples) is its choice."""
        for source in sources:
            if name in source:
                return source[name]
        choices = {"backbone": self.config.backbones, "head": self.config.heads,
                   "features": self.config.features, "probe_c": self.config.probe_cs,
                   "frozen_stages": _frozen_choices(self.config)}.get(name, [])
        return choices[0] if len(choices) == 1 else None

    def sample_relative(self, study, trial, search_space):
        params = dict(self.base.sample_relative(study, trial, search_space))
        backbone = self._known("backbone", params, trial.params)
        frozen = self._known("frozen_stages", params, trial.params)
        if backbone is not None and self._repeats(study, trial.number, backbone, frozen,
                                                  self._known("head", params, trial.params),
                                                  self._known("features", params, trial.params),
                                                  self._known("probe_c", params, trial.params)):
            drop = [name for name in ("features", "probe_c", "head") if name in params]
            if "head" not in drop and self._repeats(study, trial.number, backbone, frozen,
                                                    self._known("head", trial.params), None, None):
                drop.append("frozen_stages")  # every kind of this probe is taken and the head cannot change
            for name in drop:
                params.pop(name, None)  # drawn again, one by one, each guarded (a pinned one is not drawn)
        return params

    def sample_independent(self, study, trial, param_name, param_distribution):
        value = self.base.sample_independent(study, trial, param_name, param_distribution)
        backbone = self._known("backbone", trial.params)
        if backbone is None or param_name not in ("head", "frozen_stages", "features", "probe_c"):
            return value
        frozen = value if param_name == "frozen_stages" else self._known("frozen_stages", trial.params)
        head = value if param_name == "head" else self._known("head", trial.params)
        features = value if param_name == "features" else self._known("features", trial.params)
        probe_c = value if param_name == "probe_c" else self._known("probe_c", trial.params)
        if not self._repeats(study, trial.number, backbone, frozen, head, features, probe_c):
            return value
        if param_name in ("features", "probe_c"):
            others = [choice for choice in param_distribution.choices if choice != value and not self._repeats(
                study, trial.number, backbone, frozen, "linear", choice if param_name == "features" else features,
                choice if param_name == "probe_c" else probe_c)]
        else:
            others = _other_values(param_name, param_distribution, value, self.num_stages.get(backbone, 0))
        if not others:
            return value
        rng = np.random.default_rng(trial.number)
        return others[int(rng.integers(len(others)))]

    def _repeats(self, study, trial_number: int, backbone: str, frozen, head, features, probe_c) -> bool:
        """Whether these values make a probe already taken; unknown values (None) cannot repeat one,
        except the features and C of a probe still to be drawn: then every allowed one must be taken."""
        stages = self.num_stages.get(backbone)
        if stages is None or frozen is None or head != "linear" or resolved(frozen, stages) < stages:
            return False
        taken = probes_taken(study, stages_of=self.num_stages, drawing=trial_number)
        kinds = [features] if features is not None else self.config.features
        cs = [probe_c] if probe_c is not None else self.config.probe_cs
        return all((backbone, kind, c) in taken for kind in kinds for c in cs)


def _frozen_choices(config: SearchConfig) -> list[int | str]:
    """The values `frozen_stages` may take as the trial records them: the tokens of a list, or the one
    depth of a range LOW-LOW (a longer range: unknown here, as it depends on the backbone)."""
    mode, tokens = parse_frozen_spec(config.frozen_stages)
    if mode == "choice":
        return tokens
    return [int(tokens[0])] if tokens[0] == tokens[1] else []


def probes_taken(study: optuna.Study, stages_of: dict[str, int],
                 drawing: int | None = None) -> set[tuple[str, str, str]]:
    """(backbone, features, C choice) of every probe finished, running or queued in `study`, but for
    trial number `drawing`, whose parameters are still being drawn (its half-drawn probe is none)."""
    from optuna.trial import TrialState

    taken = set()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                          TrialState.RUNNING, TrialState.WAITING)):
        if trial.number == drawing:
            continue
        params = trial.params or trial.system_attrs.get("fixed_params", {})
        backbone = params.get("backbone")
        if backbone in stages_of and params.get("head") == "linear" and "frozen_stages" in params and \
                resolved(params["frozen_stages"], stages_of[backbone]) >= stages_of[backbone]:
            taken.add((backbone, params.get("features", "final"), params.get("probe_c", PROBE_C_CV)))
    return taken


def _other_values(name: str, distribution, value, stages: int) -> list:
    """The values `name` may take instead of `value`: another head, or a frozen depth short of the whole backbone."""
    if name == "head":
        return [c for c in distribution.choices if c != value]
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return [c for c in distribution.choices if resolved(c, stages) < stages]
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return [v for v in range(distribution.low, distribution.high + 1, distribution.step) if v < stages]
    return []


class PeerMedianPruner(optuna.pruners.BasePruner):
    """`--pruner median`, comparing like with like: at each epoch a trial is pruned when its val accuracy
    is below the median of finished trials that started the same way (`head_init`) at that epoch. A head
    that starts from the probe (LP-FT) begins near the probe's accuracy, a random head far below it; one
    median over both would prune nearly every random-head trial at its first epoch, whatever it would
    have reached. Probe trials report no epochs and so are in no comparison. Prunes nothing until
    `n_startup_trials` peers have finished."""

    def __init__(self, n_startup_trials: int = 3):
        self.n_startup_trials = n_startup_trials

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        from optuna.trial import TrialState

        step = trial.last_step
        if step is None:
            return False
        kind = trial.params.get("head_init", "random")
        peers = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                              TrialState.PRUNED))
                 if t.number != trial.number and t.params.get("head_init", "random") == kind
                 and step in t.intermediate_values]
        if len(peers) < self.n_startup_trials:
            return False
        return trial.intermediate_values[step] < float(np.median(peers))
