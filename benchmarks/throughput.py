"""Trial speed, side by side in one run: autotransfer's trial step against a plain reference loop,
cached against uncached epochs for frozen trials, and a 12-trial search with and without caching.

Three tables, one CSV each section's rows tagged by `section`:

- `step`: training images/s of the plain-path trial step (`trainer.train`, its `train_seconds`)
  and of the textbook loop a person would write (same model and initial weights, same batches,
  same augmentation call, same precision, images already in memory, torch's default Adam and
  memory layout), alternating epoch by epoch so that both see the same machine load; the median
  of the repeats and their ratio.
- `cache`: per-epoch training seconds of frozen trials on the plain path and on the cached path
  (pooled features when the whole backbone is frozen, boundary activations otherwise), the one-off
  cost of filling the cache, and for partly frozen trials the frozen share of the training FLOPs
  and the speed-up that share predicts.
- `search`: wall time and best validation accuracy of a 12-trial search with `--no-cache` and
  with caching (the default), at the search's own default epochs and image size unless told,
  for several seeds. Caching runs twice per seed: on exactly the uncached search's trial
  configurations (`cached-same-trials`, which isolates what caching changes) and as its own
  search (`cached-own-search`, whose TPE trajectory may differ, as a user's would). Each row says
  where the wall time went (outside trials, in trials, in trials with nothing frozen), and the
  uncached row's `frozen_free_speedup` is the most any cache of frozen layers could give.

    python benchmarks/throughput.py            # CPU here; on a GPU machine add --device cuda
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from autotransfer.backbones import provider_for  # noqa: E402
from autotransfer.bench.store import cpu_model  # noqa: E402
from autotransfer.config import SearchConfig  # noqa: E402
from autotransfer.data import train_transform  # noqa: E402
from autotransfer.heads import HeadConfig  # noqa: E402
from autotransfer.model import assemble  # noqa: E402
from autotransfer.search import RunOptions, Search, weights_request  # noqa: E402
from autotransfer.devices import autocast_for  # noqa: E402
from autotransfer.trainer import FitSettings, train  # noqa: E402

MOBILENETS = ("mobilenetv1_025_leaky_in1k", "mobilenetv1_025_keras_in1k")
STUDY = "throughput"
RANDOM_INIT = ("resnet18", "mobilenetv3_small_100", "efficientnet_b0", "test_resnet")  # timm names, no hub here


@dataclass(frozen=True)
class Case:
    backbone: str
    frozen: int | str  # a stage count, or "all"


DEFAULT_CASES = "mobilenetv1_025_leaky_in1k:0,mobilenetv1_025_leaky_in1k:3,resnet18:0,resnet18:2"
DEFAULT_CACHE_CASES = ("mobilenetv1_025_leaky_in1k:all,mobilenetv1_025_leaky_in1k:5,mobilenetv1_025_leaky_in1k:3,"
                       "mobilenetv1_025_leaky_in1k:1,resnet18:all,resnet18:4,resnet18:2")


def parse_cases(text: str) -> list[Case]:
    cases = []
    for item in text.split(","):
        name, _, frozen = item.partition(":")
        cases.append(Case(name, "all" if frozen == "all" else int(frozen or 0)))
    return cases


# --------------------------------------------------------------------------- the shared setup

def prepared(dataset: str, backbones: list[str], image_size: int, device: str, seed: int, work: Path) -> Search:
    """The data exactly as a trial sees it: decoded once into the data cache and mapped from it, split."""
    weights = {name: "random" for name in backbones if name in RANDOM_INIT}
    config = SearchConfig(dataset=dataset, backbones=backbones, weights=weights, image_size=image_size,
                          seed=seed).validate()
    search = Search(config, RunOptions(out=work, storage="", study_name="", device=device, quiet=True,
                                       data_cache=work / "data-cache"))  # as the CLI reads them: memory-mapped
    search.prepare()
    return search


def case_data(search: Search, case: Case):
    """The trial inputs and both splits at the backbone's size, on the search's device."""
    inputs = search.inputs_for(case.backbone)
    sized = (split.at_size(inputs.resize_size).to(search.device) for split in (search.data.train, search.data.val))
    return (inputs, *sized)


def build_model(search: Search, case: Case) -> tuple[nn.Module, int]:
    name = case.backbone
    backbone = provider_for(name, search.registries).create(name, weights_request(search.config, name))
    stages = search.infos[name].num_stages
    frozen = stages if case.frozen == "all" else int(case.frozen)
    torch.manual_seed(0)
    return assemble(backbone, HeadConfig("linear"), search.data.num_classes, frozen), frozen


# --------------------------------------------------------------------------- step: trial step vs reference loop

def reference_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                    inputs, batch_size: int, generator: torch.Generator, device: torch.device) -> float:
    """The loop from the tutorials, with the trial's augmentation call; returns training seconds."""
    autocast, _ = autocast_for(device)
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    for i in range(0, len(order) - 1, batch_size):
        index = order[i:i + batch_size]
        if len(index) < 2:
            break
        batch = train_transform(images[index], inputs.image_size, inputs.mean, inputs.std, generator)
        with autocast():
            loss = nn.functional.cross_entropy(model(batch), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            loss.item()  # the tutorials' per-step logging
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def step_rows(search: Search, cases: list[Case], repeats: int, batch_size: int) -> list[dict]:
    device = search.device
    rows = []
    for case in cases:
        inputs, train_set, val_set = case_data(search, case)
        ours, frozen = build_model(search, case)
        theirs = copy.deepcopy(ours).to(device)
        optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)  # torch's default
        generator = torch.Generator().manual_seed(1)
        trial_s, reference_s = [], []

        def then_reference(stats) -> None:  # alternate: one trial epoch, one reference epoch
            trial_s.append(stats.train_seconds)
            reference_s.append(reference_epoch(theirs, optimizer, train_set.images, train_set.labels, inputs,
                                               batch_size, generator, device))

        train(ours, train_set, val_set, inputs, FitSettings("adam", 1e-4, repeats + 1, batch_size, device, 0),
              then_reference)
        trial_s, reference_s = trial_s[1:], reference_s[1:]  # the first round warms up both
        n = len(train_set)
        trial_rate, reference_rate = n / statistics.median(trial_s), n / statistics.median(reference_s)
        rows.append({"section": "step", "backbone": case.backbone, "frozen_stages": frozen,
                     "num_stages": search.infos[case.backbone].num_stages, "image_size": inputs.image_size,
                     "batch_size": batch_size, "repeats": repeats, "trial_img_s": round(trial_rate, 1),
                     "reference_img_s": round(reference_rate, 1),
                     # each trial epoch against the reference epoch right after it, so load drift cancels
                     "ratio": round(statistics.median(r / t for t, r in zip(trial_s, reference_s)), 3)})
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- cache: cached vs uncached epochs

def training_flops(module: nn.Module, batch: torch.Tensor, labels: torch.Tensor) -> int:
    """Forward plus backward FLOPs of one training step (torch's own counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    module.train()
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(module(batch), labels).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def cached_share(model: nn.Module, frozen: int, stages: int, images: torch.Tensor, labels: torch.Tensor,
                 inputs) -> tuple[float, str]:
    """The share of a plain training step's FLOPs the cached step still does, and where it starts."""
    from autotransfer.cache.boundary import Replay, ReplayedModel, capture, verified_boundary
    from autotransfer.data import eval_transform

    batch = eval_transform(images, inputs.image_size, inputs.mean, inputs.std)
    plain = training_flops(model, batch, labels)
    model.eval()
    if frozen >= stages:
        with torch.no_grad():
            pooled = model.backbone(batch)
        return training_flops(model.head, pooled, labels) / plain, "pooled features"
    boundary = verified_boundary(model.backbone, batch[:8])
    with torch.no_grad():
        activation = capture(model.backbone, boundary, batch)
    with Replay(model.backbone, boundary) as replay:
        return training_flops(ReplayedModel(model, replay), activation, labels) / plain, boundary.name


def epoch_seconds(path, skip: int) -> list[float]:
    """Training seconds of the epochs after the first `skip` (warm-up, and on the boundary path the
    epochs that compute their view: that cost is reported once, as the cache build)."""
    return [stats.train_seconds for stats in path.run(lambda stats: None)][skip:]


def cache_rows(search: Search, cases: list[Case], repeats: int, batch_size: int, views: int = 2) -> list[dict]:
    from autotransfer.cache.plan import CachePolicy, TrialCaches
    from autotransfer.trainer import FitSettings

    device = search.device
    rows = []
    for case in cases:
        inputs, train_set, val_set = case_data(search, case)
        stages = search.infos[case.backbone].num_stages
        timings = {}
        for mode, policy in (("uncached", CachePolicy(enabled=False)), ("cached", CachePolicy(views=views))):
            model, frozen = build_model(search, case)
            skip = views if mode == "cached" and 0 < frozen < stages else 1
            settings = FitSettings("adam", 1e-3, repeats + skip, batch_size, device, seed=0)
            start = time.perf_counter()
            path = TrialCaches(policy).plan(model, case.backbone, train_set, val_set, inputs, frozen, stages, settings)
            plan_s = time.perf_counter() - start
            epochs = statistics.median(epoch_seconds(path, skip))
            timings[mode] = (path.mode, path.describe(), plan_s if path.mode != "boundary" else path.cache_seconds(),
                             epochs)
        model, frozen = build_model(search, case)
        sample = train_set.images[:batch_size].to(device)
        share, boundary = cached_share(model, frozen, stages, sample, train_set.labels[:batch_size].to(device), inputs)
        (_, _, _, plain_s), (mode, note, setup, cached_s) = timings["uncached"], timings["cached"]
        rows.append({"section": "cache", "backbone": case.backbone, "frozen_stages": frozen, "num_stages": stages,
                     "image_size": inputs.image_size, "batch_size": batch_size, "repeats": repeats, "path": mode,
                     "boundary": boundary, "uncached_epoch_s": round(plain_s, 4), "cached_epoch_s": round(cached_s, 4),
                     "speedup": round(plain_s / cached_s, 2), "flops_speedup": round(1 / share, 2),
                     "cache_build_s": round(setup, 2), "views": views if mode == "boundary" else "",
                     "note": note})
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- search: cached vs not

def run_search(common: list[str], out: Path, extra: list[str], enqueue: list[dict] | None = None) -> float:
    """Wall seconds of one `autotransfer search` process. Every mode first creates its study in an
    untimed process, which also brings torch's libraries back into the page cache (here they are
    often evicted between runs, and a cold import took up to 18 s), so no mode pays for that alone.
    With `enqueue`, those configurations are queued, so the timed process trains exactly them."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "autotransfer.cli", *common, *extra, "--out", str(out)]
    subprocess.run([*command, "--create-only"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if enqueue is not None:
        import optuna

        study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")
        for params in enqueue:
            study.enqueue_trial(params)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def search_summary(out: Path) -> dict:
    import optuna

    board = pd.read_csv(out / "leaderboard.csv")
    complete = board[board["state"] == "COMPLETE"]
    paths = board["cache"].value_counts().to_dict() if "cache" in board else {}
    trials = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}").get_trials(deepcopy=False)
    unfrozen = [t for t in trials if t.user_attrs.get("frozen_stages") == 0]
    return {"best_val_accuracy": round(float(complete["val_accuracy"].max()), 4), "trials_complete": len(complete),
            "trials_pruned": int((board["state"] == "PRUNED").sum()),
            "paths": "; ".join(f"{k}={v}" for k, v in sorted(paths.items())),
            # where the wall time went: inside trials, in trials with nothing frozen (no cache can
            # help those), and epochs trained (pruning decides them, and may decide differently)
            "trials_s": round(sum(t.user_attrs.get("duration_s", 0.0) for t in trials), 1),
            "unfrozen_trials_s": round(sum(t.user_attrs.get("duration_s", 0.0) for t in unfrozen), 1),
            "epochs_trained": sum(len(t.intermediate_values) for t in trials),
            "trial_params": [t.params for t in sorted(trials, key=lambda t: t.number)]}


def frozen_free_seconds(row: dict) -> float:
    """A search row's wall time if every trial with frozen stages took no time at all: the process
    start-up and the unfrozen trials (which no cache of frozen layers can shorten) remain. Its
    ratio to the wall time bounds any cache at equal trials, up to pruning deciding differently."""
    return row["wall_s"] - row["trials_s"] + row["unfrozen_trials_s"]


def search_rows(dataset: str, backbones: list[str], trials: int, epochs: int | None, image_size: int | None,
                frozen_stages: str | None, seeds: list[int], work: Path, device: str) -> list[dict]:
    """Per seed: the uncached search (seeded TPE), the cached search on exactly its trial
    configurations (`same-trials`: what caching changes, trajectory held fixed), and the cached
    search choosing its own (`own-search`: what a user sees, trajectory free to differ). The opening
    portfolio is off in all three (this measures the caches, not the choice of trials), so `same-trials`
    replays exactly the uncached search's trials."""
    weights = [f"--weights={name}=random" for name in backbones if name in RANDOM_INIT]
    sizing = ([] if epochs is None else ["--epochs", str(epochs)]) + (
        [] if image_size is None else ["--image-size", str(image_size)]) + (
        [] if frozen_stages is None else ["--frozen-stages", frozen_stages])
    shape = {"trials": trials, "epochs": epochs or "default", "image_size": image_size or "default",
             "frozen_stages": frozen_stages or "default", "backbone": "|".join(backbones)}
    rows = []
    for seed in seeds:
        common = ["search", "--dataset", dataset, "--study", STUDY, "--backbones", ",".join(backbones), *weights,
                  "--trials", str(trials), *sizing, "--seed", str(seed), "--device", device, "--quiet",
                  "--no-portfolio"]
        base = work / f"search-{seed}"
        uncached_s = run_search(common, base / "uncached", ["--no-cache"])
        uncached = search_summary(base / "uncached")
        same_s = run_search(common, base / "same", [], enqueue=uncached["trial_params"])
        own_s = run_search(common, base / "own", [])
        for mode, seconds, out in (("uncached", uncached_s, "uncached"), ("cached-same-trials", same_s, "same"),
                                   ("cached-own-search", own_s, "own")):
            summary = uncached if out == "uncached" else search_summary(base / out)
            summary.pop("trial_params")
            row = {"section": "search", "mode": mode, "seed": seed, **shape, "wall_s": round(seconds, 1),
                   **summary, "outside_trials_s": round(seconds - summary["trials_s"], 1)}
            if mode == "uncached":
                row["frozen_free_speedup"] = round(row["wall_s"] / frozen_free_seconds(row), 2)
            else:
                row["speedup"] = round(uncached_s / seconds, 2)
                row["accuracy_gap_points"] = round(100 * (row["best_val_accuracy"] - uncached["best_val_accuracy"]), 2)
            rows.append(row)
            print(row, flush=True)
    for mode in ("cached-same-trials", "cached-own-search"):
        mine = [r for r in rows if r["mode"] == mode]
        base = [r for r in rows if r["mode"] == "uncached"]
        rows.append({"section": "search", "mode": f"{mode} (mean of {len(seeds)} seeds)", "seed": "all", **shape,
                     "wall_s": round(statistics.mean(r["wall_s"] for r in mine), 1),
                     "best_val_accuracy": round(statistics.mean(r["best_val_accuracy"] for r in mine), 4),
                     "speedup": round(statistics.mean(r["wall_s"] for r in base)
                                      / statistics.mean(r["wall_s"] for r in mine), 2),
                     "accuracy_gap_points": round(100 * statistics.mean(
                         r["best_val_accuracy"] - b["best_val_accuracy"] for r, b in zip(mine, base)), 2),
                     "frozen_free_speedup": round(statistics.mean(b["wall_s"] for b in base)
                                                  / statistics.mean(frozen_free_seconds(b) for b in base), 2)})
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- main

def environment(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(SHARED / "datasets" / "hymenoptera"))
    parser.add_argument("--cases", default=DEFAULT_CASES, help="backbone:frozen_stages pairs for the step table")
    parser.add_argument("--cache-cases", default=DEFAULT_CACHE_CASES, help="pairs for the cache table")
    parser.add_argument("--image-size", type=int, default=None, help="default: the search's own (at most 224 px on CPU); the committed CPU results are at 160")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--search-epochs", type=int, default=None, help="default: the search's own default")
    parser.add_argument("--search-image-size", type=int, default=None, help="default: the search's own default")
    parser.add_argument("--search-seeds", default="0,1,2")
    parser.add_argument("--search-backbones", default=",".join(MOBILENETS))
    parser.add_argument("--search-frozen-stages", default=None, help="default: the search's own space (0-all)")
    parser.add_argument("--sections", default="step,cache,search")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/throughput-<device>.csv)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-throughput", help="scratch folder")
    args = parser.parse_args()
    os.environ.setdefault("AUTOTRANSFER_MOBILENETV1_WEIGHTS", str(SHARED / "weights"))
    sections = set(args.sections.split(","))
    step_cases, cache_cases = parse_cases(args.cases), parse_cases(args.cache_cases)
    backbones = sorted({c.backbone for c in step_cases + cache_cases})
    search = prepared(args.dataset, backbones, args.image_size, args.device, seed=0, work=args.work)
    rows: list[dict] = []
    if "step" in sections:
        rows += step_rows(search, step_cases, args.repeats, args.batch_size)
    if "cache" in sections:
        rows += cache_rows(search, cache_cases, args.repeats, args.batch_size)
    if "search" in sections:
        rows += search_rows(args.dataset, args.search_backbones.split(","), args.trials, args.search_epochs,
                            args.search_image_size, args.search_frozen_stages,
                            [int(seed) for seed in args.search_seeds.split(",")], args.work, args.device)
    extra = environment(search.device)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"throughput-{search.device.type}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row)) + list(extra)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({**row, **extra} for row in rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
