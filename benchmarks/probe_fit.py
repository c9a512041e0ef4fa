"""The probe's fit (CV over C, then the final fit): one BLAS thread against the machine's BLAS pool.

`probe.fit_probe` runs lbfgs on one BLAS thread by default. This measures why, side by side in one
process with torch loaded and its thread pool warmed (as in a search): the same fits with
`blas_threads=1` and with the BLAS pool left as it is (`None`), on synthetic class-structured
features of the sizes the probe meets (a few hundred to tens of thousands of images, 256-1024
features), and checks that both choose the same C. Writes benchmarks/results/probe_fit-<cpu count>cpu.csv.

    python benchmarks/probe_fit.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import torch

from autotransfer.bench.store import cpu_model
from autotransfer.probe import fit_probe

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((200, 256, 2), (1_150, 256, 10), (5_000, 256, 10), (5_000, 1_024, 10), (20_000, 1_024, 10))


def features(rows: int, width: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative pooled-feature-like data: class means plus noise, through a ReLU."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    means = rng.normal(0, 1, (classes, width))
    return np.maximum(means[labels] * 0.5 + rng.normal(0, 1, (rows, width)), 0).astype(np.float32), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"probe_fit-{os.cpu_count()}cpu.csv")
    torch.nn.functional.conv2d(torch.randn(32, 16, 56, 56), torch.randn(32, 16, 3, 3))  # warm torch's pool
    rows = []
    for shape in SHAPES:
        x, y = features(*shape)
        seconds: dict[str, list[float]] = {"one": [], "pool": []}
        chosen = {}
        for _ in range(args.repeats):  # interleaved, so a busy moment hits both
            for name, threads in (("one", 1), ("pool", None)):
                start = time.perf_counter()
                chosen[name] = fit_probe(x, y, shape[2], seed=0, blas_threads=threads).c
                seconds[name].append(time.perf_counter() - start)
        one, pool = min(seconds["one"]), min(seconds["pool"])
        rows.append({"cpu": cpu_model(), "cpus": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "images": shape[0], "features": shape[1],
                     "classes": shape[2], "one_thread_s": round(one, 3), "blas_pool_s": round(pool, 3),
                     "speedup": round(pool / one, 2), "same_c": chosen["one"] == chosen["pool"]})
        print(rows[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
