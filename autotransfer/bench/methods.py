"""The benchmarked methods. Every one goes through the same data pipeline (`Search.prepare`) with
the same seed and validation fraction, so all of them see the identical train/val split.

Each method chooses with its own rule on train and val only (a search: its best trial by val;
the probe: C by CV on train, the backbone by val; the seed recipe: its one trial). Only then is
the chosen model scored on the test split, outside the method's timed run: the store's
`test_accuracy` is a number no choice saw, and `best_val_accuracy` the one each chose on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import torch

from ..config import SearchConfig
from ..errors import UserError
from ..probe import PROBE_CS, Probe, fit_probe
from ..record import TrialRecord
from ..search import RunOptions, Search, default_storage
from ..selection import chosen_over_time
from .suite import Budget

STUDY = "bench"


@dataclass
class MethodResult:
    best_val_accuracy: float | None
    time_to_best_s: float | None
    wall_s: float
    trials_complete: int = 0
    trials_pruned: int = 0
    trials_failed: int = 0
    best_config: dict[str, Any] = field(default_factory=dict)
    # (seconds in, val accuracy, test accuracy) each time the best-by-val choice changed; test None without a split
    curve: list[tuple[float, float, float | None]] = field(default_factory=list)
    test_accuracy: float | None = None  # the chosen model's, on the test split
    test_images: int | None = None


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
    val_as_test: bool = False
    plugins: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = True
    device: str = "auto"
    data_cache: Path | None = None  # the decoded-image cache the cells of a run share (warmed before them)

    def config(self, **overrides: Any) -> SearchConfig:
        base = dict(dataset=self.dataset, backbones=list(self.backbones), pretrained=self.pretrained,
                    weights=dict(self.weights), epochs=self.budget.epochs, image_size=self.image_size,
                    val_fraction=self.val_fraction, val_as_test=self.val_as_test, seed=self.seed,
                    trials=self.budget.trials,
                    timeout=self.budget.timeout_s)
        base.update(overrides)
        base["weights"] = {k: v for k, v in base["weights"].items() if k in base["backbones"]}
        return SearchConfig(**base).validate()

    def run_options(self) -> RunOptions:
        return RunOptions(out=self.work, storage=default_storage(self.work), study_name=STUDY, device=self.device,
                          quiet=self.quiet, plugins=self.plugins, best_history=True, data_cache=self.data_cache)


def warm_data_cache(run: MethodRun) -> None:
    """Decode the cell's dataset into `run.data_cache` off every method's clock, so each cell of it reads
    the images from the cache alike (none pays the decode for the others)."""
    from ..devices import resolve_device
    from ..plugins import registries
    from ..prepared import prepare_search

    if run.data_cache is not None:
        prepare_search(run.config(trials=1, timeout=None), registries(run.plugins), resolve_device(run.device),
                       run.work, data_cache=run.data_cache).release_data()


# --------------------------------------------------------------------------- searches

def _run_search(run: MethodRun, search: Search) -> MethodResult:
    started, clock = datetime.now(), time.perf_counter()  # optuna stamps trials with naive local time
    from ..holdout import saved_trial
    from ..search import BEST_DIR

    study = search.run()
    wall = time.perf_counter() - clock
    result = _study_result(study, started, wall, saved_trial(search.out / BEST_DIR),
                           len(search.data.val) if search.data is not None else None)
    return _scored_on_test(result, study, search)  # after the clock: scoring is no part of the method


def _study_result(study: optuna.Study, started: datetime, wall: float, chosen: int | None,
                  val_images: int | None) -> MethodResult:
    """The search's result as it chose (selection.py): the trial in best/, and the curve of what
    best/ held over time."""
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    count = {state: sum(t.state == state for t in trials) for state in (states.COMPLETE, states.PRUNED, states.FAIL)}
    complete = [t for t in trials if t.state == states.COMPLETE and t.value is not None]
    best = next((t for t in complete if t.number == chosen), None)
    finished = sorted(complete, key=lambda t: t.datetime_complete)
    return MethodResult(
        best_val_accuracy=None if best is None else float(best.value),
        time_to_best_s=None if best is None else max(0.0, (best.datetime_complete - started).total_seconds()),
        wall_s=wall, trials_complete=count[states.COMPLETE], trials_pruned=count[states.PRUNED],
        trials_failed=count[states.FAIL], best_config={} if best is None else trial_config(best),
        curve=best_so_far([(max(0.0, (t.datetime_complete - started).total_seconds()), float(t.value), t.number)
                           for t in finished], val_images,
                          {t.number: TrialRecord.of(t).trainable_params for t in finished}))


def _scored_on_test(result: MethodResult, study: optuna.Study, search: Search) -> MethodResult:
    """The search's own test score of its choice (stored in the study when it finished), and the test
    accuracy of every model that was best-by-val on the way, kept in best-history/ as they were saved."""
    from ..holdout import stored_score
    from ..predict import score_model
    from ..search import BEST_HISTORY_DIR

    test = search.data.test if search.data is not None else None
    if test is None:
        result.curve = [(t, v, None) for t, v, _ in result.curve]
        return result
    stored = stored_score(study) or {}
    result.test_accuracy, result.test_images = stored.get("test_accuracy"), stored.get("test_images")
    curve = []
    for seconds, val, number in result.curve:
        kept = search.out / BEST_HISTORY_DIR / f"trial-{number}"
        score = score_model(kept, search.registries, search.device, images=test) if kept.is_dir() else None
        curve.append((seconds, val, None if score is None else score.accuracy))
    result.curve = curve
    return result


def best_so_far(points: list[tuple], val_images: int | None = None,
                sizes: dict[int, int | None] | None = None) -> list[tuple]:
    """The anytime curve: the (time, accuracy, trial, ...) points that replaced the chosen one
    (`selection.chosen_over_time`, `sizes` the trials' trainable parameter counts; without a val size,
    every gain), times rounded to the millisecond; anything after the accuracy rides along."""
    chosen = chosen_over_time(points, val_images, (lambda point: sizes.get(point[2])) if sizes else (lambda point: None))
    return [(round(point[0], 3), *point[1:]) for point in chosen]


def trial_config(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The sampled parameters plus the pinned ones Optuna only records as user attributes."""
    record = TrialRecord.of(trial)
    pinned = {name: getattr(record, name) for name in ("frozen_stages", "lr", "head_dropout", "pretrained", "image_size")}
    return {**trial.params, **{name: value for name, value in pinned.items() if value is not None}}


def autotransfer(run: MethodRun) -> MethodResult:
    """The default search: TPE sampler and median pruning over every candidate."""
    return _run_search(run, Search(run.config(), run.run_options()))


def autotransfer_prerank(run: MethodRun) -> MethodResult:
    """Pre-rank the candidates with a transferability score, search the top half."""
    scorer = run.options.get("scorer", "logme")
    config = run.config(prerank=scorer, top_k=max(1, math.ceil(len(run.backbones) / 2)))
    return _run_search(run, Search(config, run.run_options()))


def random_search(run: MethodRun) -> MethodResult:
    """Uniform random draws from the first trial: no opening portfolio, no pruning."""
    return _run_search(run, Search(run.config(pruner="none", portfolio=False), run.run_options(),
                                   sampler=lambda seed: optuna.samplers.RandomSampler(seed=seed),
                                   pruner=lambda config: optuna.pruners.NopPruner()))


def seed_recipe(run: MethodRun) -> MethodResult:
    """What a person would try first: the first backbone, fine-tuned end to end from a random head, one
    trial (no opening portfolio: with only frozen 0 allowed, it would open with an LP-FT instead)."""
    lr = float(run.options.get("lr", 1e-3))
    config = run.config(backbones=run.backbones[:1], frozen_stages=str(run.options.get("frozen_stages", "0")),
                        heads=[run.options.get("head", "linear")], head_inits=["random"], portfolio=False, lr=(lr, lr),
                        optimizers=[run.options.get("optimizer", "adam")], trials=1, timeout=None, pruner="none")
    return _run_search(run, Search(config, run.run_options()))


# --------------------------------------------------------------------------- linear probe

def linear_probe(run: MethodRun) -> MethodResult:
    """Frozen pooled features + logistic regression per backbone; the best backbone by val counts.
    Each backbone's probe is scored on the test split as it is fitted, off the method's clock."""
    from ..backbones import provider_for
    from ..cache.features import FeatureCache, extract
    from ..plugins import registries
    from ..devices import resolve_device
    from ..prepared import prepare_search

    clock = time.perf_counter()
    off_clock = 0.0  # seconds spent scoring on test, not charged to the method
    prepared = prepare_search(run.config(trials=1, timeout=None), registries(run.plugins),
                              resolve_device(run.device), run.work, data_cache=run.data_cache)
    cache = FeatureCache(run.work / "features")
    cs = [float(c) for c in run.options.get("C", PROBE_CS)]
    best: tuple[float, float, dict, float | None] | None = None
    points: list[tuple[float, float, float | None]] = []
    complete = failed = 0
    for name in prepared.config.backbones:
        try:
            backbone = provider_for(name, prepared.registries).create(name, prepared.weights_for(name))
            inputs = prepared.inputs_for(name)
            size = inputs.resize_size
            train = extract(backbone.module, None, prepared.data.train.at_size(size), inputs, prepared.device, cache)
            val = extract(backbone.module, None, prepared.data.val.at_size(size), inputs, prepared.device, cache)
            accuracy, c, model = probe_accuracy(train.features, train.labels, val.features, val.labels, cs, run.seed,
                                                prepared.data.num_classes)
            seconds = time.perf_counter() - clock - off_clock
            scoring = time.perf_counter()
            test_accuracy = None
            if prepared.data.test is not None:
                test = extract(backbone.module, None, prepared.data.test.at_size(size), inputs, prepared.device, cache)
                test_accuracy = float((model.predict(test.features) == test.labels).mean())
            off_clock += time.perf_counter() - scoring
        except UserError:
            raise
        except Exception:
            failed += 1
            continue
        complete += 1
        points.append((seconds, accuracy, test_accuracy))
        if best is None or accuracy > best[0]:
            best = (accuracy, seconds,
                    {"backbone": name, "C": c, "image_size": inputs.image_size,
                     "pretrained": backbone.source if backbone.source == "random init" else "pretrained"},
                    test_accuracy)
    if best is None:
        raise RuntimeError(f"the linear probe failed on every backbone ({failed})")
    test_images = None if prepared.data.test is None else len(prepared.data.test)
    return MethodResult(best[0], best[1], time.perf_counter() - clock - off_clock, complete, 0, failed, best[2],
                        best_so_far(points), test_accuracy=best[3], test_images=test_images)


def probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                   cs: list[float], seed: int, num_classes: int) -> tuple[float, float, Probe]:
    """Validation accuracy of the probe (`probe.fit_probe`: C by CV on the training split only, the very
    fit a fully frozen search trial makes), that C, and the probe (to score it on test afterwards)."""
    probe = fit_probe(x_train, y_train, num_classes, seed, cs)
    return float((probe.predict(x_val) == y_val).mean()), probe.c, probe


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
