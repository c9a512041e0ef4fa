"""The leaderboard: one row per trial, best first, rebuilt from the Optuna storage alone."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

COLUMNS = [
    "rank", "trial", "state", "val_accuracy", "backbone", "pretrained", "frozen_stages", "num_stages",
    "head", "head_hidden", "head_dropout", "lr", "optimizer", "epochs", "trainable_params", "total_params",
    "duration_s", "image_size", "reason",
]
STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}


def _row(trial: optuna.trial.FrozenTrial) -> dict:
    params, attrs = trial.params, trial.user_attrs
    state = trial.state.name
    if state == "COMPLETE":
        accuracy = trial.value
    elif trial.intermediate_values:
        accuracy = trial.intermediate_values[max(trial.intermediate_values)]
    else:
        accuracy = None
    if attrs.get("duration_s") is not None:
        duration = attrs["duration_s"]
    elif trial.datetime_complete and trial.datetime_start:
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
    else:
        duration = None
    head = params.get("head")
    return {
        "trial": trial.number,
        "state": state,
        "val_accuracy": accuracy,
        "backbone": params.get("backbone"),
        "pretrained": attrs.get("pretrained"),
        "frozen_stages": attrs.get("frozen_stages", params.get("frozen_stages")),
        "num_stages": attrs.get("num_stages"),
        "head": head,
        "head_hidden": params.get("head_hidden") if head == "mlp" else None,
        "head_dropout": params.get("head_dropout", attrs.get("head_dropout")) if head == "mlp" else None,
        "lr": params.get("lr", attrs.get("lr")),
        "optimizer": params.get("optimizer"),
        "epochs": attrs.get("epochs_done", len(trial.intermediate_values)),
        "trainable_params": attrs.get("trainable_params"),
        "total_params": attrs.get("total_params"),
        "duration_s": round(duration, 2) if duration is not None else None,
        "image_size": attrs.get("image_size"),
        "reason": attrs.get("reason", ""),
    }


def leaderboard_frame(study: optuna.Study) -> pd.DataFrame:
    """Completed trials ranked by validation accuracy, then pruned, running and failed ones."""
    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    frame = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "rank"])
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    frame["_order"] = frame["state"].map(STATE_ORDER).fillna(9)
    frame["_acc"] = pd.to_numeric(frame["val_accuracy"], errors="coerce").fillna(-1.0)
    frame = frame.sort_values(["_order", "_acc", "trial"], ascending=[True, False, True], kind="stable")
    frame = frame.drop(columns=["_order", "_acc"]).reset_index(drop=True)
    complete = frame["state"] == "COMPLETE"
    frame.insert(0, "rank", pd.array([i + 1 if c else None for i, c in enumerate(complete)], dtype="Int64"))
    for column in ("frozen_stages", "num_stages", "head_hidden", "epochs", "trainable_params", "total_params",
                   "image_size"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    return frame


def to_markdown(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    shown["val_accuracy"] = pd.to_numeric(shown["val_accuracy"], errors="coerce").map(
        lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["lr"] = pd.to_numeric(shown["lr"], errors="coerce").map(lambda v: "" if pd.isna(v) else f"{v:.2e}")
    shown["head_dropout"] = pd.to_numeric(shown["head_dropout"], errors="coerce").map(
        lambda v: "" if pd.isna(v) else f"{v:.2f}")
    return shown.astype(object).where(shown.notna(), "").to_markdown(index=False, disable_numparse=True)


def write(frame: pd.DataFrame, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "leaderboard.csv", index=False)
    (out / "leaderboard.md").write_text(to_markdown(frame) + "\n")
