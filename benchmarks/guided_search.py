"""Scorer-guided search vs unguided search at the same trial budget, side by side in one run.

Both search the same candidate backbones on the same data with the same trials, epochs and seed;
the guided one first ranks them with `--prerank SCORER --top-k K` and searches only the best K.
Records wall time (pre-ranking included), best validation accuracy, the backbones trained, and
the guided run's weighted Kendall tau per scorer. Writes benchmarks/results/guided_search.csv.

    AUTOTRANSFER_MOBILENETV1_WEIGHTS=../shared/weights python benchmarks/guided_search.py
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CANDIDATES = "mobilenetv1_025_leaky_in1k,mobilenetv1_025_keras_in1k,resnet18,mobilenetv3_small_100"
RANDOM = ("resnet18", "mobilenetv3_small_100")  # timm names started from random init (no hub here)


def run_search(out: Path, common: list[str], extra: list[str]) -> tuple[float, pd.DataFrame]:
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autotransfer.cli", "search", *common, *extra, "--out", str(out), "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, pd.read_csv(out / "leaderboard.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(SHARED / "datasets" / "hymenoptera"))
    parser.add_argument("--backbones", default=CANDIDATES)
    parser.add_argument("--prerank", default="logme")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-guided"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guided_search.csv"))
    args = parser.parse_args()
    os.environ.setdefault("AUTOTRANSFER_MOBILENETV1_WEIGHTS", str(SHARED / "weights"))
    weights = [f"--weights={name}=random" for name in RANDOM if name in args.backbones.split(",")]
    common = ["--dataset", args.dataset, "--backbones", args.backbones, *weights, "--trials", str(args.trials),
              "--epochs", str(args.epochs), "--seed", "0"]
    work = Path(args.work)
    rows = []
    for mode, extra in (("unguided", []), ("guided", ["--prerank", args.prerank, "--top-k", str(args.top_k)])):
        seconds, board = run_search(work / mode, common, extra)
        complete = board[board["state"] == "COMPLETE"]
        tau = ""
        if mode == "guided":
            taus = pd.read_csv(work / mode / "scorer_tau.csv")
            tau = "; ".join(f"{r.scorer}={r.weighted_tau:.3f}" for r in taus.itertuples())
        rows.append({
            "mode": mode, "prerank": args.prerank if extra else "", "top_k": args.top_k if extra else "",
            "trials": args.trials, "epochs": args.epochs, "wall_s": round(seconds, 1),
            "best_val_accuracy": round(float(complete["val_accuracy"].max()), 4),
            "best_backbone": complete.iloc[0]["backbone"],
            "backbones_trained": "|".join(sorted(set(board["backbone"]))),
            "tau": tau, "cpu": platform.processor() or platform.machine(), "threads": os.cpu_count(),
        })
        print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
