"""`autotransfer bench run`: every (dataset, method, seed) cell of a suite, one store row each."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .methods import MethodResult, MethodRun, run_method, warm_data_cache
from .store import Store, environment
from .suite import Suite, load_suite


DATA_CACHE_DIR = "data-cache"  # under --work: the decoded images every cell of every run reads


@dataclass
class RunRequest:
    suite: Path
    results: Path = Path("benchmarks/results")
    work: Path = Path("runs/bench")
    only_dataset: str | None = None
    run_id: str | None = None
    night: str | None = None
    quiet: bool = False
    device: str = "auto"


def default_night() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def check_night(night: str) -> str:
    try:
        datetime.strptime(night, "%Y-%m-%d")
    except ValueError:
        raise UserError(f"--night must be a date YYYY-MM-DD, got {night!r}") from None
    return night


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


@contextmanager
def suite_environment(env: dict[str, str]) -> Iterator[None]:
    """The suite's environment variables for the run only (plugins read them when they load weights)."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_suite(request: RunRequest) -> int:
    """Run the cells not yet in the store for this run id; return how many rows were appended."""
    suite = load_suite(request.suite)
    night = check_night(request.night or default_night())
    run_id = request.run_id or f"{night}_{suite.name}"
    datasets = suite.datasets
    if request.only_dataset is not None:
        datasets = [d for d in datasets if d == request.only_dataset]
        if not datasets:
            raise UserError(f"--only-dataset {request.only_dataset!r} is not in {suite.path.name} "
                            f"({', '.join(suite.datasets)})")
    store = Store.for_suite(request.results, suite.name)
    done = store.done(run_id)
    env = environment()
    appended = 0
    with suite_environment(suite.env):
        for dataset in datasets:
            resolved = suite.resolve_dataset(dataset)
            if resolved is None:
                say(request, f"skipping dataset {dataset}: {suite.folder / dataset} does not exist")
                continue
            warmed = False
            for method in suite.methods:
                for seed in suite.seeds:
                    if (dataset, method, str(seed)) in done:
                        continue
                    if not warmed:
                        warm(suite, dataset, resolved, Path(request.work) / slug(run_id) / slug(dataset) / "warm",
                             request)
                        warmed = True
                    work = Path(request.work) / slug(run_id) / slug(dataset) / method / f"seed{seed}"
                    row = run_cell(suite, dataset, resolved, method, seed, work, request)
                    store.append({"night": night, "run_id": run_id, **env, "suite": suite.name, "dataset": dataset,
                                  "method": method, "seed": seed, "budget_trials": suite.budget.trials,
                                  "budget_timeout_s": suite.budget.timeout_s, "epochs": suite.budget.epochs, **row})
                    appended += 1
    say(request, f"{appended} row(s) appended to {store.path} (run {run_id})")
    return appended


def _method_run(suite: Suite, written: str, dataset: str, method: str, seed: int, work: Path,
                request: RunRequest) -> MethodRun:
    return MethodRun(dataset=dataset, backbones=suite.backbones, weights=suite.weights, budget=suite.budget,
                     seed=seed, work=work, image_size=suite.image_size_for(written), pretrained=suite.pretrained,
                     val_fraction=suite.val_fraction, val_as_test=written in suite.val_as_test, plugins=suite.plugins,
                     options=suite.options(method), quiet=True, device=request.device,
                     data_cache=Path(request.work) / DATA_CACHE_DIR)


def warm(suite: Suite, written: str, dataset: str, work: Path, request: RunRequest) -> None:
    """The dataset decoded into the run's data cache before its first cell; a failure here is left for
    the cells to meet (and record) themselves."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        warm_data_cache(_method_run(suite, written, dataset, suite.methods[0], suite.seeds[0], work, request))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - each cell reports its own error
        say(request, f"{Path(dataset).name}: the data cache was not warmed ({type(exc).__name__}: {exc})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_cell(suite: Suite, written: str, dataset: str, method: str, seed: int, work: Path,
             request: RunRequest) -> dict:
    """One method on one dataset with one seed, from a clean work folder; a crash becomes the row's error.
    Its images come from the run's data cache, warmed before the dataset's first cell (`warm`)."""
    if work.exists():
        shutil.rmtree(work)  # leftovers of an interrupted cell: start it over, so timings stay honest
    work.mkdir(parents=True)
    run = _method_run(suite, written, dataset, method, seed, work, request)
    clock = time.perf_counter()
    label = f"{Path(dataset).name} {method} seed {seed}"
    try:
        result = run_method(method, run)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one broken method must not end the night
        message = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        say(request, f"{label}: FAILED {message}")
        (work / "error.txt").write_text(traceback.format_exc())
        return {"wall_s": round(time.perf_counter() - clock, 3), "error": message}
    accuracy = "-" if result.best_val_accuracy is None else f"{result.best_val_accuracy:.4f}"
    test = "-" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    say(request, f"{label}: test_acc {test} (chosen by val_acc {accuracy}), {result.wall_s:.1f}s")
    return result_row(result)


def result_row(result: MethodResult) -> dict:
    return {"best_val_accuracy": result.best_val_accuracy, "test_accuracy": result.test_accuracy,
            "test_images": result.test_images, "time_to_best_s": _round(result.time_to_best_s),
            "wall_s": _round(result.wall_s), "trials_complete": result.trials_complete,
            "trials_pruned": result.trials_pruned, "trials_failed": result.trials_failed,
            "best_config": json.dumps(result.best_config, sort_keys=True, default=str), "error": "",
            "curve": json.dumps([[round(t, 3), round(v, 6), None if a is None else round(a, 6)]
                                 for t, v, a in result.curve])}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def say(request: RunRequest, message: str) -> None:
    if not request.quiet:
        print(message, file=sys.stderr, flush=True)
