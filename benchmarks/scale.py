"""How a search's cost grows: start-up, decoding, memory with several workers, epochs from 5k to 50k
images, and per-trial overhead at 100 trials. Every number comes from the real command line
(`python -m autotransfer search ...`, the `autotransfer` script), run as a user runs it, with its
stderr lines time-stamped as they arrive and its process tree's memory sampled from /proc.

Sections (rows tagged by `section`):

- `start`: the hymenoptera search (the two MobileNetV1 plugin backbones, ../shared): command to the
  first trial's first line (where its first epoch starts) on a cold run (empty --out, no warm server;
  it starts one at its end), `autotransfer server start` (which waits until that server is ready, as
  a user's next command a few seconds later finds it), three warm reruns of the study through the
  server (its data cache, feature cache and the OS page cache all warm), two without it
  (AUTOTRANSFER_WARM=0: every import again) and one through it with `--no-data-cache`.
- `size`: synthetic JPEG folders (generated once under --work: 10 classes, 90/10 train/val, sizes
  and detail of real photos, 300x225 to 640x480) at each --sizes: the cold decode into the data
  cache, the warm read of it, command to first trial, one plain epoch of a small timm model
  (`test_resnet`, random init, every stage trained, linear head from random init) at --image-size,
  and the run's peak RSS/PSS.
- `workers`: `search --workers 4` on the largest set with an empty data cache, then `--workers 1`,
  each stopped with Ctrl-C once every worker has trained for 30 s; first through a warm server (whose
  forks share its imported modules), then each worker in its own process. Reported: how many
  processes decoded (lines saying so), and the workers' memory at its peak (the sum over the worker
  processes, sampled together; a served worker is its caller plus the server's fork running it, and
  the server's own share is a column of its own). RSS counts a shared page once per process that
  maps it, so four readers of one page-cache copy show four times its size; PSS divides each shared
  page among the processes that map it and is the memory they hold. Both are reported.
- `overhead`: a 100-trial search of a tiny model on the built-in digits; per trial, the wall time
  not spent in the objective (`duration_s`, model creation to last epoch): sampling, storage
  writes, the leaderboard and best/ upkeep, by decile of trials, and the start and end of the run.

    .venv/bin/python benchmarks/scale.py                       # writes benchmarks/results/scale-cpu.csv
    .venv/bin/python benchmarks/scale.py --sizes 5000 --sections size   # one part
    python benchmarks/scale.py --device cuda                   # a GPU machine: scale-cuda.csv

Every search runs with the --device given here (default cpu); on CUDA the workers section puts its four
workers on one GPU (`--trials-per-gpu 4`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from autotransfer import warm as warm_start  # `warm` names the runs through it below
from autotransfer.bench.store import cpu_model  # the bench's reading of /proc/cpuinfo

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MOBILENETS = "mobilenetv1_025_leaky_in1k,mobilenetv1_025_keras_in1k"
CLASSES = 10
SHAPES = ((300, 225), (400, 300), (500, 375), (375, 500), (640, 480))
FIRST_TRIAL = re.compile(r"^(?:\[worker \d+\] )?trial (\d+): ")  # local workers' lines carry their prefix
EPOCH = re.compile(r"^(?:\[worker \d+\] )?\s+trial (\d+) epoch 1/\d+: .*\(([\d.]+)s\)")
READY = re.compile(r"^images ready in ([\d.]+)s")
SAMPLE_S = 0.25
TRAIN_S = 30.0  # seconds the workers section lets every worker train before it presses Ctrl-C


# --------------------------------------------------------------------------- synthetic data

_NOISE = None


def _write_images(job: tuple[str, int, int]) -> int:
    import numpy as np
    from PIL import Image

    global _NOISE
    if _NOISE is None:  # one noise field per process, cropped at a random place for each image
        _NOISE = np.random.default_rng(os.getpid()).normal(0, 18, (720, 960, 3)).astype(np.float32)
    folder, start, stop = job
    for index in range(start, stop):
        rng = np.random.default_rng(index)
        width, height = SHAPES[index % len(SHAPES)]
        # Coarse colour blobs plus fine noise: JPEGs of about the size and detail of photos.
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                        Image.Resampling.BICUBIC)
        top, left = rng.integers(0, 720 - height), rng.integers(0, 960 - width)
        noise = _NOISE[top:top + height, left:left + width]
        pixels = np.clip(np.asarray(coarse, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        split = "val" if (index // CLASSES) % 10 == 0 else "train"
        path = Path(folder) / split / f"class{index % CLASSES}" / f"{index:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=85)
    return stop - start


def synthetic_folder(work: Path, count: int) -> Path:
    """An image folder of `count` JPEGs, made once (a marker file says it is complete)."""
    folder = work / f"synthetic-{count}"
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for split in ("train", "val"):
        for c in range(CLASSES):
            (folder / split / f"class{c}").mkdir(parents=True, exist_ok=True)
    step = 500
    jobs = [(str(folder), start, min(start + step, count)) for start in range(0, count, step)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        made = sum(pool.map(_write_images, jobs))
    (folder / ".complete").write_text(f"{made}\n")
    print(f"generated {made} JPEGs in {folder} in {time.perf_counter() - started:.0f}s", flush=True)
    return folder


# --------------------------------------------------------------------------- one command, timed and sampled

def _tree(roots: list[int]) -> list[int]:
    """`roots` and their descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _memory(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in bytes, from /proc/PID/smaps_rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            text = handle.read()
    except OSError:
        return None
    values = dict(re.findall(r"^(Rss|Pss):\s+(\d+) kB", text, flags=re.MULTILINE))
    return int(values.get("Rss", 0)) * 1024, int(values.get("Pss", 0)) * 1024


def _is_worker(pid: int) -> bool:
    """A worker's process: `autotransfer worker ...` run in its own process, the caller of one run by a warm
    server, or the server's fork running it (named `at:worker`, warm.py)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"\0worker\0" in handle.read():
                return True
        with open(f"/proc/{pid}/comm", "rb") as handle:
            return handle.read().strip() == warm_start.process_name(["worker"]).encode()
    except OSError:
        return False


def _servers() -> list[int]:
    """The warm servers' pids (this run's private server folder, set in main)."""
    return [pid for pid, _, _ in warm_start.servers()]


@dataclass
class Run:
    """One command's stderr lines (seconds since start, text), exit status, wall time and memory."""

    lines: list[tuple[float, str]]
    returncode: int
    wall_s: float
    peak_rss: int = 0  # the command's processes but workers and servers (its caller and fork when served)
    peak_pss: int = 0
    workers_peak_rss: int = 0  # the sum over worker processes, at the sample where it was largest
    workers_peak_pss: int = 0
    server_pss_at_workers_peak: int = 0  # the warm server's own share while the workers peaked
    worker_peak_pss: list[int] = field(default_factory=list)  # each worker's own peak

    def first(self, pattern: re.Pattern) -> tuple[float, re.Match] | None:
        for seconds, text in self.lines:
            match = pattern.search(text)
            if match:
                return seconds, match
        return None

    def count(self, needle: str) -> int:
        return sum(needle in text for _, text in self.lines)


def run(args: list[str], device: str, env: dict | None = None, stop_after: tuple[int, float] | None = None,
        warm: bool = False) -> Run:
    """Run the program (`python -m autotransfer`, as the `autotransfer` script); with `stop_after` (trials,
    seconds), press Ctrl-C (SIGINT to its process group) once that many trials have started and then that
    many seconds have passed, as a user would. A search runs on `device`. `warm`: through this run's warm
    server when one is up (and starting one at its end when none is), else every command in its own
    process. Memory is sampled over the command's process tree and the warm servers' (whose forks run the
    commands they serve)."""
    command = [sys.executable, "-m", "autotransfer", *args] + (["--device", device] if args[0] == "search" else [])
    # Python's default is to cache compiled bytecode; a sandbox's PYTHONDONTWRITEBYTECODE would make every
    # run recompile the package, which no user's rerun pays.
    base = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    base["AUTOTRANSFER_WARM"] = "1" if warm else "0"
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**base, **(env or {})}, start_new_session=True)
    lines: list[tuple[float, str]] = []
    result = Run(lines, 0, 0.0)
    workers: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total_rss = total_pss = 0
            servers = _servers() if warm else []
            server_pss = 0
            command_rss = command_pss = 0
            for pid in _tree([process.pid, *servers]):
                memory = _memory(pid)
                if memory is None:
                    continue
                if pid in servers:
                    server_pss = memory[1]
                elif _is_worker(pid):
                    total_rss, total_pss = total_rss + memory[0], total_pss + memory[1]
                    workers[pid] = max(workers.get(pid, 0), memory[1])
                else:  # the command: its own process, or its caller and the server's fork running it
                    command_rss, command_pss = command_rss + memory[0], command_pss + memory[1]
            result.peak_rss, result.peak_pss = max(result.peak_rss, command_rss), max(result.peak_pss, command_pss)
            result.workers_peak_rss = max(result.workers_peak_rss, total_rss)
            if total_pss > result.workers_peak_pss:
                result.workers_peak_pss, result.server_pss_at_workers_peak = total_pss, server_pss
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    interrupt: threading.Timer | None = None
    for text in process.stderr:
        lines.append((time.perf_counter() - started, text.rstrip("\n")))
        if stop_after and interrupt is None and sum(bool(FIRST_TRIAL.search(t)) for _, t in lines) >= stop_after[0]:
            interrupt = threading.Timer(stop_after[1], lambda: os.killpg(process.pid, signal.SIGINT))
            interrupt.start()
    result.returncode = process.wait()
    if interrupt is not None:
        interrupt.cancel()
    result.wall_s = time.perf_counter() - started
    done.set()
    sampler.join()
    result.worker_peak_pss = sorted(workers.values())
    if result.returncode != 0 and not (stop_after and interrupt is not None):
        tail = "\n".join(text for _, text in lines[-15:])
        raise SystemExit(f"{' '.join(args)} failed with status {result.returncode}:\n{tail}")
    return result


def _mb(value: int) -> float:
    return round(value / 2**20, 1)


def _first_trial(result: Run) -> float | None:
    found = result.first(FIRST_TRIAL)
    return None if found is None else round(found[0], 2)


def _ready(result: Run) -> float | None:
    found = result.first(READY)
    return None if found is None else float(found[1][1])


def _epoch(result: Run) -> float | None:
    found = result.first(EPOCH)
    return None if found is None else float(found[1][2])


# --------------------------------------------------------------------------- sections

def start_rows(work: Path, epochs: int, device: str) -> list[dict]:
    dataset = SHARED / "datasets" / "hymenoptera"
    if not dataset.is_dir():
        print(f"skipping the start section: {dataset} does not exist", flush=True)
        return []
    out = work / "start-hymenoptera"
    shutil.rmtree(out, ignore_errors=True)
    _stop_servers()
    env = {"AUTOTRANSFER_MOBILENETV1_WEIGHTS": str(SHARED / "weights"), "HF_HUB_OFFLINE": "1"}
    base = ["search", "--dataset", str(dataset), "--backbones", MOBILENETS, "--epochs", str(epochs), "--out", str(out)]
    rows = []
    # cold: nothing cached and no warm server (it starts one at its end); then the server is waited for, as
    # a user's next command a few seconds later would find it; then reruns through it, and without it.
    cases = [("cold", True, []), ("server start", True, None), ("warm rerun", True, []), ("warm rerun", True, []),
             ("warm rerun", True, []), ("warm rerun, no warm server", False, []),
             ("warm rerun, no warm server", False, []), ("warm rerun --no-data-cache", True, ["--no-data-cache"])]
    trials = 0
    for case, warm, extra in cases:
        if extra is None:
            result = run(["server", "start"], device, env, warm=True)
            rows.append({"section": "start", "dataset": "hymenoptera", "case": case, "wall_s": round(result.wall_s, 1)})
        else:
            trials += 1
            result = run([*base, "--trials", str(trials), *extra], device, env, warm=warm)
            rows.append({"section": "start", "dataset": "hymenoptera", "case": case, "images": 398, "warm_server": warm,
                         "to_first_trial_s": _first_trial(result), "images_ready_s": _ready(result),
                         "wall_s": round(result.wall_s, 1), "peak_rss_mb": _mb(result.peak_rss),
                         "peak_pss_mb": _mb(result.peak_pss)})
        print(rows[-1], flush=True)
    _stop_servers()
    return rows


def _stop_servers() -> None:
    warm_start.stop_servers(wait_s=60)


def _tiny_search(folder: Path, out: Path, cache: Path, image_size: int, extra: list[str]) -> list[str]:
    return ["search", "--dataset", str(folder), "--backbones", "test_resnet", "--no-pretrained", "--image-size",
            str(image_size), "--frozen-stages", "0", "--heads", "linear", "--head-init", "random", "--no-portfolio",
            "--epochs", "1",
            "--out", str(out), "--data-cache", str(cache), *extra]


def size_rows(work: Path, sizes: list[int], image_size: int, device: str) -> list[dict]:
    rows = []
    for count in sizes:
        folder = synthetic_folder(work, count)
        cache = work / f"data-cache-{count}"
        shutil.rmtree(cache, ignore_errors=True)
        for case in ("cold", "warm"):  # cold: decode into the empty cache, create the study, stop
            out = work / f"size-{count}-{case}"
            shutil.rmtree(out, ignore_errors=True)
            extra = ["--trials", "1"] + (["--create-only"] if case == "cold" else [])
            result = run(_tiny_search(folder, out, cache, image_size, extra), device)
            rows.append({"section": "size", "dataset": f"synthetic-{count}", "case": case, "images": count,
                         "decoded": result.count("into the data cache"), "images_ready_s": _ready(result),
                         "to_first_trial_s": _first_trial(result), "epoch_s": _epoch(result),
                         "wall_s": round(result.wall_s, 1), "peak_rss_mb": _mb(result.peak_rss),
                         "peak_pss_mb": _mb(result.peak_pss),
                         "cache_mb": _mb(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()))})
            print(rows[-1], flush=True)
    return rows


def worker_rows(work: Path, count: int, image_size: int, device: str, train_s: float = TRAIN_S) -> list[dict]:
    folder = synthetic_folder(work, count)
    cache = work / f"data-cache-workers-{count}"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    _stop_servers()
    # Four first, on the empty cache: the decode happens once, in the parent. Through a warm server (started
    # and waited for first), whose forks share its imports; then each in its own process.
    for warm in (True, False):
        if warm:
            run(["server", "start"], device, warm=True)
        for workers in (4, 1):
            out = work / f"workers-{count}-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            # Each worker's trial is stopped (Ctrl-C) after `train_s` of training: its images are mapped,
            # read (checked) and being trained on by then, which is when its memory peaks; a whole 50k epoch
            # on four processes sharing two cores would take a quarter of an hour and show nothing more.
            per_gpu = ["--trials-per-gpu", str(workers)] if device != "cpu" else []
            result = run(_tiny_search(folder, out, cache, image_size, ["--trials", str(workers), "--workers",
                                                                       str(workers), *per_gpu]),
                         device, stop_after=(workers, train_s), warm=warm)
            rows.append({"section": "workers", "dataset": f"synthetic-{count}", "case": f"{workers} worker(s)",
                         "warm_server": warm, "images": count, "workers": workers,
                         "decoded": result.count("into the data cache"),
                         "read_from_cache": result.count("from the data cache"), "wall_s": round(result.wall_s, 1),
                         "trained_s_before_ctrl_c": train_s,
                         "parent_peak_pss_mb": _mb(result.peak_pss),
                         "workers_peak_rss_mb": _mb(result.workers_peak_rss),
                         "workers_peak_pss_mb": _mb(result.workers_peak_pss),
                         "server_pss_mb": _mb(result.server_pss_at_workers_peak),
                         "worker_peak_pss_mb": " ".join(str(_mb(v)) for v in result.worker_peak_pss)})
            print(rows[-1], flush=True)
        _stop_servers()
    for warm in (True, False):
        one = next(row for row in rows if row["workers"] == 1 and row["warm_server"] == warm)
        for row in rows:
            if row["warm_server"] == warm:
                row["pss_vs_one_worker"] = round(row["workers_peak_pss_mb"] / one["workers_peak_pss_mb"], 3)
                row["rss_vs_one_worker"] = round(row["workers_peak_rss_mb"] / one["workers_peak_rss_mb"], 3)
                with_server = row["workers_peak_pss_mb"] + row["server_pss_mb"]
                row["pss_with_server_vs_one_worker"] = round(
                    with_server / (one["workers_peak_pss_mb"] + one["server_pss_mb"]), 3)
    return rows


def overhead_rows(work: Path, trials: int, device: str) -> list[dict]:
    import optuna

    out = work / "overhead"
    shutil.rmtree(out, ignore_errors=True)
    result = run(["search", "--dataset", "builtin:digits:0-2", "--backbones", "test_resnet", "--no-pretrained",
                  "--image-size", "16", "--epochs", "1", "--trials", str(trials), "--out", str(out)], device)
    study = optuna.load_study(study_name="digits-0-2", storage=f"sqlite:///{out / 'study.db'}")
    done = sorted((t for t in study.trials if t.datetime_complete is not None), key=lambda t: t.datetime_start)
    first_start, last_end = done[0].datetime_start, max(t.datetime_complete for t in done)
    spans = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    inside = [t.user_attrs.get("duration_s") or 0.0 for t in done]
    gaps = [(b.datetime_start - a.datetime_complete).total_seconds() for a, b in zip(done, done[1:])] + [0.0]
    per_trial = [span - work_s + gap for span, work_s, gap in zip(spans, inside, gaps)]
    rows = []
    decile = max(1, len(done) // 10)
    for start in range(0, len(done), decile):
        part = per_trial[start:start + decile]
        rows.append({"section": "overhead", "dataset": "builtin:digits:0-2", "case": f"trials {start + 1}-"
                     f"{start + len(part)}", "trials": len(part),
                     "overhead_per_trial_s": round(sum(part) / len(part), 3),
                     "objective_per_trial_s": round(sum(inside[start:start + decile]) / len(part), 3)})
    total_span = (last_end - first_start).total_seconds()
    rows.append({"section": "overhead", "dataset": "builtin:digits:0-2", "case": f"all {len(done)} trials",
                 "trials": len(done), "overhead_per_trial_s": round((total_span - sum(inside)) / len(done), 3),
                 "objective_per_trial_s": round(sum(inside) / len(done), 3),
                 "to_first_trial_s": _first_trial(result), "wall_s": round(result.wall_s, 1),
                 "after_last_trial_s": round(result.wall_s - (_first_trial(result) or 0) - total_span, 2)})
    for row in rows:
        print(row, flush=True)
    return rows


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="start,size,workers,overhead")
    parser.add_argument("--sizes", default="5000,20000,50000", help="synthetic set sizes for the size section")
    parser.add_argument("--workers-size", type=int, default=50000, help="the set the workers section runs on")
    parser.add_argument("--image-size", type=int, default=152, help="crop size of the synthetic searches "
                        "(test_resnet's crop_pct 0.95: 152 px decodes at 160 px, 77 kB an image)")
    parser.add_argument("--start-epochs", type=int, default=4)
    parser.add_argument("--train-s", type=float, default=TRAIN_S, help="seconds every worker trains before Ctrl-C")
    parser.add_argument("--trials", type=int, default=100, help="trials of the overhead section")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autotransfer-scale"),
                        help="scratch folder (the 50k set and its caches take about 5 GB)")
    parser.add_argument("--device", default="cpu", help="the searches' --device: cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path (default benchmarks/results/scale-<device type>.csv)")
    args = parser.parse_args()
    # Started in the background (nohup, `cmd &`), this process inherits SIGINT ignored, and so would the
    # searches it runs: then the workers section's Ctrl-C would do nothing. A handler is reset to the
    # default in an exec'd child, an ignored signal is not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args.out = args.out or ROOT / "benchmarks" / "results" / f"scale-{args.device.split(':')[0]}.csv"
    sections = set(args.sections.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["AUTOTRANSFER_WARM_DIR"] = str(args.work / "warm")  # this run's servers only, stopped after use
    rows: list[dict] = []
    started = time.perf_counter()
    sections_run = [("start", lambda: start_rows(args.work, args.start_epochs, args.device)),
                    ("size", lambda: size_rows(args.work, [int(n) for n in args.sizes.split(",")], args.image_size, args.device)),
                    ("workers", lambda: worker_rows(args.work, args.workers_size, args.image_size, args.device, args.train_s)),
                    ("overhead", lambda: overhead_rows(args.work, args.trials, args.device))]
    for name, measure in sections_run:
        if name in sections:
            rows += measure()
            save(rows, args.out, started, args.device)  # after each section: an interrupted run keeps what it measured
    print(f"wrote {args.out}")


def gpu_name(device: str) -> str:
    if device == "cpu":
        return "none"
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def save(rows: list[dict], out: Path, started: float, device: str) -> None:
    import pandas as pd

    extra = {"device": device, "gpu": gpu_name(device), "cpu": cpu_model(),
             "cores": os.cpu_count(),
             "load_1m": round(os.getloadavg()[0], 2), "bench_wall_s": round(time.perf_counter() - started)}
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{**row, **extra} for row in rows]).to_csv(out, index=False)  # columns in first-seen order


if __name__ == "__main__":
    main()
