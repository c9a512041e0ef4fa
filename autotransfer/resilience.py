"""Trials that outlive their worker: per-epoch checkpoints and resume, one halved-batch retry on
CUDA out-of-memory, and a best/ folder that stays right when several workers finish at once."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import torch
from torch import nn

from .devices import release_memory
from .record import TrialRecord, key, write
from .selection import replaces
from .cache.plan import TrialPath
from .model import CONFIG_FILE, ModelCard, TransferModel, save_model
from .train_state import TrainState, load_trained_tensors, trained_tensors
from .trainer import EpochStats

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
KEY_ATTR = key("checkpoint_key")  # set on a trial's first run; retried copies inherit it with the user attrs
RESUMED_ATTR = key("resumed_from_epoch")
OOM_RETRY_ATTR = key("oom_retry")


@dataclass(frozen=True)
class TrialStateStore:
    """A trial's per-epoch training state (train_state.TrainState, to resume a retried trial), in
    `<out>/checkpoints/trial-<key>/state.pt`, shared by a trial and its retries. Not to be confused
    with a `pretrain` checkpoint folder (backbones/checkpoints.py), which is a backbone."""

    folder: Path

    @classmethod
    def for_key(cls, out: Path, key: int) -> "TrialStateStore":
        return cls(Path(out) / CHECKPOINT_DIR / f"trial-{key}")

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    def save(self, state: TrainState) -> None:
        state.save(self.path)

    def load(self) -> TrainState | None:
        if not self.path.is_file():
            return None
        try:
            return TrainState.load(self.path)
        except Exception as exc:  # a foreign or damaged file: start the trial afresh rather than fail it
            log.warning("ignoring unreadable checkpoint %s: %s: %s", self.path, type(exc).__name__, exc)
            return None

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def checkpoint_key(user_attrs: dict[str, Any], number: int) -> int:
    stored = TrialRecord.from_attrs(user_attrs).checkpoint_key
    return number if stored is None else int(stored)


def fit_trial(out: Path, trial: optuna.Trial, model: TransferModel, path: TrialPath,
              on_epoch: Callable[[EpochStats], None]) -> list[EpochStats]:
    """Run the trial's planned path (plain, features or boundary) with a checkpoint after every
    epoch, resuming from the trial's (or the trial it retries) last one, and on CUDA out-of-memory
    one retry at half the batch with two-step gradient accumulation, so the effective batch and the
    schedule stay the same. Checkpoints hold the whole `model`'s trained tensors, so one written on
    one path resumes on another (a retry elsewhere may plan differently). Checkpoints live under `out`."""
    store = TrialStateStore.for_key(out, checkpoint_key(trial.user_attrs, trial.number))

    def save(state: TrainState) -> None:
        """The retry of a trial taken over shares its checkpoint folder: never write into it."""
        if taken_over(trial):
            raise TrialTakenOver(f"trial {trial.number} was failed by the heartbeat check and retried elsewhere")
        store.save(state)

    batch_size, device = path.settings.batch_size, path.settings.device
    resume = store.load()
    if resume is not None:
        replay(trial, resume)
    start = {name: t.detach().to("cpu", copy=True) for name, t in trained_tensors(model).items()}
    accumulation = path.settings.accumulation
    while True:
        try:
            return path.run(on_epoch, accumulation=accumulation, resume=resume, on_checkpoint=save)
        except torch.cuda.OutOfMemoryError:
            if accumulation > 1 or batch_size < 4:
                raise
        accumulation = 2
        release_memory(device)  # outside the except block, so the traceback's tensors are gone
        write(trial, oom_retry=f"batch {batch_size} as 2 x {batch_size // 2} (gradient accumulation)")
        log.warning("trial %d: CUDA out of memory at batch %d; retrying at %d with gradient accumulation",
                    trial.number, batch_size, batch_size // 2)
        resume = store.load()
        if resume is None:
            load_trained_tensors(model, start)


class TrialTakenOver(Exception):
    """This worker's heartbeats were late: its trial was failed in the storage and handed to a retry."""


def taken_over(trial: optuna.Trial) -> bool:
    """Whether the storage no longer holds `trial` as running (another worker failed it as stale)."""
    state = trial.study._storage.get_trial(trial._trial_id).state
    return state != optuna.trial.TrialState.RUNNING


def replay(trial: optuna.Trial, state: TrainState) -> None:
    """Give the resuming trial its predecessor's finished epochs, for the pruner and the leaderboard."""
    write(trial, resumed_from_epoch=state.epoch)
    for stats in state.history:
        trial.report(stats["val_accuracy"], stats["epoch"])
    write(trial, epochs_done=state.epoch)


# --------------------------------------------------------------------------- best/

def publish_best(study: optuna.Study, model: nn.Module, card: ModelCard, folder: Path,
                 history: Path | None = None) -> bool:
    """Compare with what best/ holds and replace it only when `selection.replaces` says so, under a file lock, so two workers finishing together cannot leave the
    worse model there. Exact ties go to the lower trial number. With `history`, every model that was best/ is also kept as
    `history/trial-<n>` (the benchmark scores each later, for its anytime curve)."""
    folder = Path(folder)
    with best_lock(folder):
        card_file = folder / CONFIG_FILE
        current = json.loads(card_file.read_text()) if card_file.is_file() else None
        if current is not None and not _beats(study, card, current):
            return False
        save_model(model, card, folder)
        if history is not None:
            kept = Path(history) / f"trial-{card.trial}"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(folder, kept)
        return True


@contextmanager
def best_lock(folder: Path) -> Iterator[None]:
    """The file lock every writer of best/ holds: publishing a model, adding its test score."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _beats(study: optuna.Study, card: ModelCard, current: dict[str, Any]) -> bool:
    if current.get("val_accuracy") is None or card.val_accuracy != current["val_accuracy"]:
        return replaces(card.val_accuracy, current.get("val_accuracy"), card.val_images, card.trainable_params,
                        current.get("trainable_params"))
    if current.get("trial") is None or card.trial < current["trial"]:
        return True
    # An equal, earlier trial keeps its place unless it died before it was recorded (this may be its retry).
    alive = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    return states.get(current["trial"]) not in alive
