"""The benchmarked methods. Every one goes through the same data pipeline (`Search.prepare`) with
the same seed and validation fraction, so all of them are scored on the identical validation split."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import torch

from ..config import SearchConfig
from ..errors import UserError
from ..search import RunOptions, Search, default_storage
from .suite import Budget

STUDY = "bench"
PROBE_CS = (0.01, 0.1, 1.0)  # large C converges slowly on wide random-init features


@dataclass
class MethodResult:
    best_val_accuracy: float | None
    time_to_best_s: float | None
    wall_s: float
    trials_complete: int = 0
    trials_pruned: int = 0
    trials_failed: int = 0
    best_config: dict[str, Any] = field(default_factory=dict)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (seconds in, best accuracy so far) at each gain


@dataclass
class MethodRun:
    """One (dataset, method, seed) cell; `work` is this cell's own folder (study, feature cache)."""

    dataset: str
    backbones: list[str]
    weights: dict[str, str]
    budget: Budget
    seed: int
    work: Path
    image_size: int | None = None
    pretrained: bool = True
    val_fraction: float = 0.2
    plugins: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = True
    device: str = "auto"

    def config(self, **overrides: Any) -> SearchConfig:
        base = dict(dataset=self.dataset, backbones=list(self.backbones), pretrained=self.pretrained,
                    weights=dict(self.weights), epochs=self.budget.epochs, image_size=self.image_size,
                    val_fraction=self.val_fraction, seed=self.seed, trials=self.budget.trials,
                    timeout=self.budget.timeout_s)
        base.update(overrides)
        base["weights"] = {k: v for k, v in base["weights"].items() if k in base["backbones"]}
        return SearchConfig(**base).validate()

    def run_options(self) -> RunOptions:
        return RunOptions(out=self.work, storage=default_storage(self.work), study_name=STUDY, device=self.device,
                          quiet=self.quiet, plugins=self.plugins)


class RandomSearch(Search):
    """The baseline: uniform random sampling of the same space, no pruning."""

    def _sampler(self, previous_trials: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=self.config.seed + previous_trials)

    def _pruner(self) -> optuna.pruners.BasePruner:
        return optuna.pruners.NopPruner()


# --------------------------------------------------------------------------- searches

def _run_search(run: MethodRun, search: Search) -> MethodResult:
    started, clock = datetime.now(), time.perf_counter()  # optuna stamps trials with naive local time
    study = search.run()
    return _study_result(study, started, time.perf_counter() - clock)


def _study_result(study: optuna.Study, started: datetime, wall: float) -> MethodResult:
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    count = {state: sum(t.state == state for t in trials) for state in (states.COMPLETE, states.PRUNED, states.FAIL)}
    complete = [t for t in trials if t.state == states.COMPLETE and t.value is not None]
    best = max(complete, key=lambda t: t.value) if complete else None
    finished = sorted(complete, key=lambda t: t.datetime_complete)
    return MethodResult(
        best_val_accuracy=None if best is None else float(best.value),
        time_to_best_s=None if best is None else max(0.0, (best.datetime_complete - started).total_seconds()),
        wall_s=wall, trials_complete=count[states.COMPLETE], trials_pruned=count[states.PRUNED],
        trials_failed=count[states.FAIL], best_config={} if best is None else trial_config(best),
        curve=best_so_far([(max(0.0, (t.datetime_complete - started).total_seconds()), float(t.value))
                           for t in finished]))


def best_so_far(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The anytime curve: keep a (time, accuracy) point only where it beats every earlier one."""
    curve: list[tuple[float, float]] = []
    for seconds, accuracy in sorted(points):
        if not curve or accuracy > curve[-1][1]:
            curve.append((round(seconds, 3), accuracy))
    return curve


def trial_config(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The sampled parameters plus the pinned ones Optuna only records as user attributes."""
    config = dict(trial.params)
    for key in ("frozen_stages", "lr", "head_dropout", "pretrained", "image_size"):
        if key in trial.user_attrs:
            config[key] = trial.user_attrs[key]
    return config


def autotransfer(run: MethodRun) -> MethodResult:
    """The default search: TPE sampler and median pruning over every candidate."""
    return _run_search(run, Search(run.config(), run.run_options()))


def autotransfer_prerank(run: MethodRun) -> MethodResult:
    """Pre-rank the candidates with a transferability score, search the top half."""
    scorer = run.options.get("scorer", "logme")
    config = run.config(prerank=scorer, top_k=max(1, math.ceil(len(run.backbones) / 2)))
    return _run_search(run, Search(config, run.run_options()))


def random_search(run: MethodRun) -> MethodResult:
    return _run_search(run, RandomSearch(run.config(pruner="none"), run.run_options()))


def seed_recipe(run: MethodRun) -> MethodResult:
    """What a person would try first: the first backbone, fine-tuned end to end, one trial."""
    lr = float(run.options.get("lr", 1e-3))
    config = run.config(backbones=run.backbones[:1], frozen_stages=str(run.options.get("frozen_stages", "0")),
                        heads=[run.options.get("head", "linear")], lr=(lr, lr),
                        optimizers=[run.options.get("optimizer", "adam")], trials=1, timeout=None, pruner="none")
    return _run_search(run, Search(config, run.run_options()))


# --------------------------------------------------------------------------- linear probe

def linear_probe(run: MethodRun) -> MethodResult:
    """Frozen pooled features + logistic regression per backbone; the best backbone counts."""
    from ..backbones import provider_for
    from ..features import FeatureCache, extract
    from ..search import weights_request

    clock = time.perf_counter()
    search = Search(run.config(trials=1, timeout=None), RunOptions(out=run.work, storage="", study_name="",
                                                                    device=run.device, quiet=True, plugins=run.plugins))
    search.prepare()
    cache = FeatureCache(run.work / "features")
    cs = [float(c) for c in run.options.get("C", PROBE_CS)]
    best: tuple[float, float, dict] | None = None
    points: list[tuple[float, float]] = []
    complete = failed = 0
    for name in search.config.backbones:
        try:
            backbone = provider_for(name, search.registries).create(name, weights_request(search.config, name))
            inputs = search.inputs_for(name)
            size = inputs.resize_size
            train = extract(backbone.module, None, search.data.train.at_size(size), inputs, search.device, cache)
            val = extract(backbone.module, None, search.data.val.at_size(size), inputs, search.device, cache)
            accuracy, c = probe_accuracy(train.features, train.labels, val.features, val.labels, cs, run.seed)
        except UserError:
            raise
        except Exception:
            failed += 1
            continue
        complete += 1
        points.append((time.perf_counter() - clock, accuracy))
        if best is None or accuracy > best[0]:
            best = (accuracy, time.perf_counter() - clock,
                    {"backbone": name, "C": c, "image_size": inputs.image_size,
                     "pretrained": backbone.source if backbone.source == "random init" else "pretrained"})
    if best is None:
        raise RuntimeError(f"the linear probe failed on every backbone ({failed})")
    return MethodResult(best[0], best[1], time.perf_counter() - clock, complete, 0, failed, best[2],
                        best_so_far(points))


def probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                   cs: list[float], seed: int) -> tuple[float, float]:
    """Validation accuracy of a logistic regression whose C was chosen by CV on the training split only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    counts = np.bincount(y_train) if len(y_train) else np.zeros(0, np.int64)
    counts = counts[counts > 0]
    folds = min(3, int(counts.min())) if len(counts) > 1 else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny folds
        if folds >= 2 and len(cs) > 1:
            grid = GridSearchCV(model, {"logisticregression__C": cs}, cv=StratifiedKFold(folds, shuffle=True,
                                                                                         random_state=seed))
            grid.fit(x_train, y_train)
            model, c = grid.best_estimator_, float(grid.best_params_["logisticregression__C"])
        else:
            c = cs[len(cs) // 2]
            model.set_params(logisticregression__C=c).fit(x_train, y_train)
    return float((model.predict(x_val) == y_val).mean()), c


METHOD_FUNCTIONS: dict[str, Callable[[MethodRun], MethodResult]] = {
    "autotransfer": autotransfer,
    "autotransfer-prerank": autotransfer_prerank,
    "random": random_search,
    "linear-probe": linear_probe,
    "seed-recipe": seed_recipe,
}


def run_method(method: str, run: MethodRun) -> MethodResult:
    torch.manual_seed(run.seed)
    return METHOD_FUNCTIONS[method](run)
