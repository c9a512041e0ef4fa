"""Data pipeline: decode-once in-memory cache, the on-disk data cache memory-mapped, and decoding
JPEGs every epoch, side by side.

Measures images/s of the training input pipeline alone (decode/crop/augment/normalise, no model)
on a real image folder, for the path a search takes when the images fit in memory (decoded in the
process, or mapped from the data cache: the default), and for the worker-DataLoader fallback it
takes when they do not. The in-memory and mapped passes alternate, --rounds times (median), so
both see the same machine load. Writes benchmarks/results/decode_cache.csv.

    python benchmarks/decode_cache.py [--dataset ../shared/datasets/hymenoptera] [--epochs 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from autotransfer.data import FolderSource, PixelCache, prepare, train_transform

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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_cache.csv"))
    args = parser.parse_args()
    refs = FolderSource().load(args.dataset)
    decode_size = int(round(args.size / 0.875))

    start = time.perf_counter()
    cached = prepare(refs, decode_size, val_fraction=0.2, seed=0)
    decode_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        prepare(refs, decode_size, val_fraction=0.2, seed=0, cache=PixelCache(Path(folder)))  # decodes into it
        build_seconds = time.perf_counter() - start
        start = time.perf_counter()
        mapped = prepare(refs, decode_size, val_fraction=0.2, seed=0, cache=PixelCache(Path(folder)))
        read_seconds = time.perf_counter() - start
        cached_runs, mapped_runs = [], []
        for _ in range(args.rounds):
            cached_runs.append(pipeline_rate(cached.train, args.epochs, args.size))
            mapped_runs.append(pipeline_rate(mapped.train, args.epochs, args.size))
        cached_rate, cached_seconds = statistics.median(cached_runs)
        mapped_rate, mapped_seconds = statistics.median(mapped_runs)

    streamed = prepare(refs, decode_size, val_fraction=0.2, seed=0, memory_budget=0)
    streamed_rate, streamed_seconds = pipeline_rate(streamed.train, args.epochs, args.size)

    rows = [
        {"path": "decode once, cached uint8", "epochs": args.epochs, "images_per_s": round(cached_rate, 1),
         "epoch_seconds": round(cached_seconds / args.epochs, 3), "one_time_decode_s": round(decode_seconds, 2),
         "warm_read_s": None},
        {"path": "data cache, memory-mapped", "epochs": args.epochs, "images_per_s": round(mapped_rate, 1),
         "epoch_seconds": round(mapped_seconds / args.epochs, 3), "one_time_decode_s": round(build_seconds, 2),
         "warm_read_s": round(read_seconds, 3)},
        {"path": "decode every epoch (workers)", "epochs": args.epochs, "images_per_s": round(streamed_rate, 1),
         "epoch_seconds": round(streamed_seconds / args.epochs, 3), "one_time_decode_s": 0.0, "warm_read_s": None},
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
    print(f"speed-up of the cached pipeline: {cached_rate / streamed_rate:.1f}x; mapped vs in memory: "
          f"{mapped_rate / cached_rate:.2f}x (written to {out})")


if __name__ == "__main__":
    main()
