"""Data pipeline: decode-once in-memory cache vs decoding JPEGs every epoch, side by side.

Measures images/s of the training input pipeline alone (decode/crop/augment/normalise, no model)
on a real image folder, for the path a search takes when the images fit in memory and for the
worker-DataLoader fallback it takes when they do not. Writes benchmarks/results/decode_cache.csv.

    python benchmarks/decode_cache.py [--dataset ../shared/datasets/hymenoptera] [--epochs 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

import torch

from autotransfer.data import FolderSource, prepare, train_transform

ROOT = Path(__file__).resolve().parents[1]


def pipeline_rate(image_set, epochs: int, size: int) -> tuple[float, float]:
    """(images/s over `epochs` full passes, seconds) for batches of 32 through the train transform."""
    generator = torch.Generator().manual_seed(0)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _ in image_set.batches(32, shuffle=True, generator=generator):
            train_transform(images, size, (0.5,) * 3, (0.5,) * 3, generator)
            seen += len(images)
    seconds = time.perf_counter() - start
    return seen / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_cache.csv"))
    args = parser.parse_args()
    refs = FolderSource().load(args.dataset)
    decode_size = int(round(args.size / 0.875))

    start = time.perf_counter()
    cached = prepare(refs, decode_size, val_fraction=0.2, seed=0)
    decode_seconds = time.perf_counter() - start
    cached_rate, cached_seconds = pipeline_rate(cached.train, args.epochs, args.size)

    streamed = prepare(refs, decode_size, val_fraction=0.2, seed=0, memory_budget=0)
    streamed_rate, streamed_seconds = pipeline_rate(streamed.train, args.epochs, args.size)

    rows = [
        {"path": "decode once, cached uint8", "epochs": args.epochs, "images_per_s": round(cached_rate, 1),
         "epoch_seconds": round(cached_seconds / args.epochs, 3), "one_time_decode_s": round(decode_seconds, 2)},
        {"path": "decode every epoch (workers)", "epochs": args.epochs, "images_per_s": round(streamed_rate, 1),
         "epoch_seconds": round(streamed_seconds / args.epochs, 3), "one_time_decode_s": 0.0},
    ]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    for row in rows:
        row.update(dataset=Path(args.dataset).name, train_images=len(cached.train), size=args.size, machine=machine)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"{row['path']:32s} {row['images_per_s']:8.1f} img/s  {row['epoch_seconds']:.3f} s/epoch")
    print(f"speed-up of the cached pipeline: {cached_rate / streamed_rate:.1f}x (written to {out})")


if __name__ == "__main__":
    main()
