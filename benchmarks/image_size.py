"""The CLI search at several crop sizes, side by side: best val accuracy and wall time per seed.

The default crop on CPU is the backbone's pretrained input size capped at `config.CPU_IMAGE_SIZE_CAP`
(and at 4x the images' own size). This runs the same `autotransfer search` (a new study each time,
nothing cached between runs) at each `--sizes` value for each seed, alternating sizes within a seed so
machine load falls on both alike, and writes one row per run to
benchmarks/results/image_size-<dataset folder>.csv. Defaults: issue 16's acceptance search (hymenoptera,
the two MobileNetV1-0.25 plugin backbones, 12 trials of 4 epochs). `best_val` is the leaderboard's
first, `chosen_val` the model the search chose (best/, selection.py).

    python benchmarks/image_size.py [--sizes 160,224] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autotransfer.bench.store import cpu_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIELDS = ("dataset", "backbones", "trials", "epochs", "image_size", "seed", "best_val", "best_trial",
          "best_kind", "chosen_val", "chosen_trial", "wall_s", "load_before", "cpu")


def best_row(leaderboard: Path) -> dict[str, str]:
    with leaderboard.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["rank"]]
    return min(rows, key=lambda row: int(row["rank"]))


def kind(row: dict[str, str]) -> str:
    if row["features"]:
        return f"{row['features']} probe" if row["head_init"] == "probe" else f"{row['features']} head"
    return f"frozen {row['frozen_stages']}/{row['num_stages']}, {row['head_init']} head, lr {float(row['lr']):.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(SHARED / "datasets" / "hymenoptera"))
    parser.add_argument("--backbones", default="mobilenetv1_025_leaky_in1k,mobilenetv1_025_keras_in1k")
    parser.add_argument("--weights", default=str(SHARED / "weights"), help="AUTOTRANSFER_MOBILENETV1_WEIGHTS")
    parser.add_argument("--sizes", default="160,224")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    env = {**os.environ, "AUTOTRANSFER_MOBILENETV1_WEIGHTS": args.weights}
    out = ROOT / "benchmarks" / "results" / f"image_size-{Path(args.dataset).name}.csv"
    rows = []
    for seed in (int(seed) for seed in args.seeds.split(",")):
        for size in sizes if seed % 2 == 0 else sizes[::-1]:
            with tempfile.TemporaryDirectory() as work:
                load = os.getloadavg()[0]
                start = time.perf_counter()
                subprocess.run([str(Path(sys.executable).with_name("autotransfer")), "search", "--dataset", args.dataset,
                                "--backbones", args.backbones, "--trials", str(args.trials), "--epochs",
                                str(args.epochs), "--image-size", str(size), "--seed", str(seed), "--out", work,
                                "--quiet"], check=True, env=env, stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - start
                best = best_row(Path(work) / "leaderboard.csv")
                chosen = json.loads((Path(work) / "best" / "model.json").read_text())  # selection.py's choice
            rows.append({"dataset": Path(args.dataset).name, "backbones": args.backbones, "trials": args.trials,
                         "epochs": args.epochs, "image_size": size, "seed": seed,
                         "best_val": f"{float(best['val_accuracy']):.4f}", "best_trial": best["trial"],
                         "best_kind": kind(best), "chosen_val": f"{chosen['val_accuracy']:.4f}",
                         "chosen_trial": chosen["trial"], "wall_s": f"{wall:.1f}", "load_before": f"{load:.2f}",
                         "cpu": cpu_model()})
            print(rows[-1], flush=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
