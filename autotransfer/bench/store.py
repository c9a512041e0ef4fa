"""The results store: one append-only CSV per suite, one row per (night, dataset, method, seed).

Rows are appended and flushed one at a time, so a run killed mid-way keeps everything it
finished, and a rerun with the same run id picks up where it stopped. After any append the file's
header is exactly COLUMNS: an older store whose columns are all known (in any order) is rewritten
once, atomically, with the missing columns empty and every row kept; unknown columns are an error.
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

COLUMNS = [
    "night", "run_id", "git_commit", "torch", "timm", "optuna", "cpu", "gpu", "suite", "dataset", "method", "seed",
    "budget_trials", "budget_timeout_s", "epochs", "best_val_accuracy", "test_accuracy", "test_images",
    "time_to_best_s", "wall_s", "trials_complete", "trials_pruned", "trials_failed", "best_config", "error", "curve",
]
KEY = ("dataset", "method", "seed")


@dataclass
class Store:
    path: Path

    @classmethod
    def for_suite(cls, results: str | Path, suite: str) -> "Store":
        return cls(Path(results) / f"{suite}.csv")

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))

    def done(self, run_id: str) -> set[tuple[str, str, str]]:
        """(dataset, method, seed) cells this run already recorded (as strings, as the CSV holds them)."""
        return {tuple(row[k] for k in KEY) for row in self.rows() if row.get("run_id") == run_id}

    def append(self, row: dict) -> None:
        """Write one row and flush it to disk before the next cell starts."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        if not new:
            self._check_header()
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="raise")
            if new:
                writer.writeheader()
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
            handle.flush()
            os.fsync(handle.fileno())

    def _check_header(self) -> None:
        with open(self.path, newline="") as handle:
            header = next(csv.reader(handle), [])
        if header == COLUMNS:
            return
        if upgradable(header):
            self._add_columns()
            return
        unknown = ", ".join(c for c in header if c not in COLUMNS) or "repeated or no columns"
        raise UserError(f"{self.path} has other columns than this version writes ({unknown}); move it aside or use "
                        "another --results folder")

    def _add_columns(self) -> None:
        """An older store lacks some columns: rewrite it once in COLUMNS order with them empty, atomically."""
        rows = self.rows()
        if any(None in row for row in rows):  # csv puts values beyond the header under None: rewriting would drop them
            raise UserError(f"{self.path} has a row with more values than its header; fix it before appending to it")
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(staging, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: row.get(k) or "" for k in COLUMNS} for row in rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, self.path)


def upgradable(header: list[str]) -> bool:
    """An older store's header: known columns only, each once, in any order (so rewriting loses nothing)."""
    return bool(header) and len(set(header)) == len(header) and set(header) <= set(COLUMNS)


def environment() -> dict[str, str]:
    """Versions and hardware, stored on every row: a regression is only meaningful on like machines."""
    import optuna
    import timm
    import torch

    return {"git_commit": git_commit(), "torch": torch.__version__, "timm": timm.__version__,
            "optuna": optuna.__version__, "cpu": cpu_model(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
