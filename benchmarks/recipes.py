"""The opening's expensive recipes, one trial each: which fine-tune and LP-FT settings to queue.

Runs `autotransfer search --trials 1 --no-portfolio` once per (dataset, recipe, backbone, seed), the
space pinned to that one recipe (trial 0, so its seed is the search's `--seed`, as in the bench's
`seed-recipe` cell), on the datasets, pretrained backbones, image sizes, epochs and environment of a
bench suite (default `suites/nightly-cpu.toml`), and writes each trial's val and test accuracy (test:
the dataset's test split, or its val split under the suite's `val_as_test`) and wall time to
benchmarks/results/issue16-recipes.csv. Needs ../shared (datasets and the MobileNetV1 weights).

    python benchmarks/recipes.py [--datasets digits,hymenoptera,cifar10_small] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from autotransfer.bench.store import cpu_model
from autotransfer.bench.suite import Suite, load_suite
from autotransfer.config import RANDOM_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "suites" / "nightly-cpu.toml"
RECIPES = {  # name: the flags that pin the space to it (linear head, Adam, the suite's epochs)
    "fine-tune lr 1e-3": ["--frozen-stages", "0", "--head-init", "random", "--lr", "1e-3"],
    "fine-tune lr 3e-3": ["--frozen-stages", "0", "--head-init", "random", "--lr", "3e-3"],
    "lp-ft frozen 0 lr 1e-4": ["--frozen-stages", "0", "--head-init", "probe", "--lr", "1e-4"],
    "lp-ft frozen 0 lr 3e-4": ["--frozen-stages", "0", "--head-init", "probe", "--lr", "3e-4"],
    "lp-ft frozen 3 lr 1e-4": ["--frozen-stages", "3", "--head-init", "probe", "--lr", "1e-4"],
    "lp-ft frozen 3 lr 3e-4": ["--frozen-stages", "3", "--head-init", "probe", "--lr", "3e-4"],
}
CHOSEN = re.compile(r"chosen: trial 0 by val_accuracy ([0-9.]+)")
TESTED = re.compile(r"^test_accuracy ([0-9.]+)", re.MULTILINE)


def short_name(spec: str) -> str:
    """The CSV's dataset column: `digits` for builtin:digits, else the folder's name."""
    return spec.split(":")[-1] if spec.startswith("builtin:") else Path(spec).name


def run_cell(suite: Suite, spec: str, recipe: str, backbone: str, seed: int, work: Path) -> dict:
    dataset, path = short_name(spec), suite.resolve_dataset(spec)
    if path is None:
        raise SystemExit(f"dataset {spec} of {suite.path} is missing (see ../shared/README.md)")
    extra = ["--val-as-test"] if spec in suite.val_as_test else []
    size = suite.image_size_for(spec)
    out = work / f"{dataset}-{recipe.replace(' ', '_')}-{backbone}-{seed}"
    command = [sys.executable, "-m", "autotransfer.cli", "search", "--dataset", path, "--backbones", backbone,
               *(["--image-size", str(size)] if size else []), "--epochs", str(suite.budget.epochs),
               "--trials", "1", "--seed", str(seed), "--no-portfolio", "--optimizers", "adam", "--heads", "linear",
               *RECIPES[recipe], *extra, "--out", str(out)]
    env = {**os.environ, **suite.env}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    val, test = CHOSEN.search(done.stdout), TESTED.search(done.stdout)
    if done.returncode != 0 or val is None or test is None:
        raise SystemExit(f"{' '.join(command)} failed (rc {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {"date": date.today().isoformat(), "cpu": cpu_model(),
            "dataset": dataset, "recipe": recipe, "backbone": backbone, "seed": seed, "epochs": suite.budget.epochs,
            "val_accuracy": float(val.group(1)), "test_accuracy": float(test.group(1)),
            "wall_s": round(wall, 2), "flags": " ".join(RECIPES[recipe] + extra)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=str(SUITE), help="datasets, backbones, sizes, epochs and env from here")
    parser.add_argument("--datasets", default=None, help="comma list of short names (default: the suite's)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma list of the recipe names above")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-recipes"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "issue16-recipes.csv"))
    args = parser.parse_args()
    suite = load_suite(args.suite)
    specs = [spec for spec in suite.datasets
             if args.datasets is None or short_name(spec) in args.datasets.split(",")]
    backbones = [name for name in suite.backbones if suite.weights.get(name) != RANDOM_WEIGHTS]  # pretrained only
    rows = [run_cell(suite, spec, recipe, backbone, int(seed), Path(args.work))
            for spec in specs for seed in args.seeds.split(",")
            for backbone in backbones for recipe in args.recipes.split(",")]
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        print(dataset)
        for recipe in args.recipes.split(","):
            for backbone in backbones:
                cells = [r for r in rows if r["dataset"] == dataset and r["recipe"] == recipe and r["backbone"] == backbone]
                mean = sum(r["test_accuracy"] for r in cells) / len(cells)
                print(f"  {recipe:24s} {backbone:28s} test {mean:.4f} over {len(cells)} seed(s)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
