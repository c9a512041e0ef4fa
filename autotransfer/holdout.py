"""The test split's one use: score the model a search chose, once, after the choice.

Invariant: nothing here runs before the search has chosen. The chosen model is the one in
`best/` (chosen by val accuracy, selection.py); it is scored on the test split through the predict
path, and the result is stored in the study (`TEST_ATTR`) and in `best/model.json`. The score is
keyed by the trial it belongs to, so with several workers whoever finishes the study computes it
once (under the best/ lock) and everyone else reads it back; a later, better trial gets its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import optuna
import torch

from .record import TEST_KEY
from .data import ImageRef, ImageSet
from .model import CONFIG_FILE
from .predict import SplitScore, score_model
from .resilience import best_lock

TEST_ATTR = TEST_KEY  # the study attribute (record.py)
UNFINISHED = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)


def stored_score(study: optuna.Study) -> dict | None:
    """{"trial", "test_accuracy", "test_images"} of the last scored best trial, or None."""
    value = study.user_attrs.get(TEST_ATTR)
    return dict(value) if isinstance(value, dict) else None


def study_finished(study: optuna.Study) -> bool:
    """No trial is running or waiting: the last worker to stop is the one that sees this."""
    return not study.get_trials(deepcopy=False, states=UNFINISHED)


def saved_trial(best: Path) -> int | None:
    card = Path(best) / CONFIG_FILE
    if not card.is_file():
        return None
    return json.loads(card.read_text()).get("trial")


def score_best(study: optuna.Study, best: Path, registries, device: torch.device, *,
               images: ImageSet | None = None, refs: Sequence[ImageRef] | None = None,
               labels: np.ndarray | None = None) -> dict | None:
    """Score `best/` on the test split unless its trial's score is stored already; store it in the
    study and the model card. None when there is no saved model. Give `images` (the test split
    decoded at the search's decode size) or `refs` and `labels` (decoded here, as predict does)."""
    best = Path(best)
    with best_lock(best):
        trial = saved_trial(best)
        if trial is None:
            return None
        stored = stored_score(study)
        if stored is not None and stored.get("trial") == trial:
            return stored
        score = score_model(best, registries, device, images=images, refs=refs, labels=labels)
        record = score.to_dict()
        study.set_user_attr(TEST_ATTR, record)
        _write_into_card(best, score)
        return record


def _write_into_card(best: Path, score: SplitScore) -> None:
    """Add the test score to best/model.json, atomically (readers see the old card or the new one)."""
    card_file = best / CONFIG_FILE
    card = json.loads(card_file.read_text())
    card["test_accuracy"], card["test_images"] = score.accuracy, score.images
    staging = card_file.with_name(f".{CONFIG_FILE}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(card, indent=2) + "\n")
    staging.chmod(card_file.stat().st_mode & 0o777)
    os.replace(staging, card_file)


def selection_summary(study: optuna.Study, frame, *, has_test: bool, best_dir: Path | None = None) -> str:
    """The closing lines of a search: which number chose the model (the trial in `best_dir`; the
    leaderboard's first without one), and which one nothing chose with."""
    complete = frame[frame["state"] == "COMPLETE"]
    if not len(complete):
        return "no trial completed, so no model was chosen"
    saved = saved_trial(best_dir) if best_dir is not None else None
    rows = complete[complete["trial"] == saved]  # none when nothing is saved
    best = rows.iloc[0] if len(rows) else complete.iloc[0]
    chosen = (f"chosen: trial {int(best['trial'])} by val_accuracy {float(best['val_accuracy']):.4f} "
              "(the number the choice was made on, so it is optimistic)")
    if int(best["trial"]) != int(complete.iloc[0]["trial"]):
        top = complete.iloc[0]
        chosen += (f"\n  trial {int(top['trial'])}'s val_accuracy {float(top['val_accuracy']):.4f} is within the "
                   "standard error of this val set and it trains more parameters, so the smaller trial stays chosen "
                   "(selection.py)")
    if not has_test:
        return (chosen + "\nno test split: for an accuracy no choice saw, add test/ beside train/ "
                "(or CSV split=test, or --val-as-test)")
    stored = stored_score(study)
    if stored is None or stored.get("trial") != int(best["trial"]):
        return chosen + "\ntest_accuracy: not scored yet (the worker that finishes the study scores it)"
    return (chosen + f"\ntest_accuracy {stored['test_accuracy']:.4f} on {stored['test_images']} test images: "
            "scored once, after the choice, and used for nothing")
