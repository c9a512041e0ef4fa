"""The leaderboard: one row per trial, best first, rebuilt from the Optuna storage alone.

Rows are ranked by `val_accuracy`, the number the search chose with. `test_accuracy` is filled on
one row only, the chosen trial's, once it has been scored on the test split (holdout.py); it
never takes part in the ranking.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

COLUMNS = [
    "rank", "trial", "state", "val_accuracy", "test_accuracy", "backbone", "pretrained", "frozen_stages", "num_stages",
    "head", "head_hidden", "head_dropout", "head_init", "lr", "optimizer", "epochs", "trainable_params", "total_params",
    "duration_s", "image_size", "cache", "reason",
]
STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}


def _reason(trial: optuna.trial.FrozenTrial, retries: dict[int, int]) -> str:
    """The recorded reason; a failed trial without one was failed by the storage's heartbeat check
    (its worker was killed, frozen or cut off before it could record anything)."""
    reason = trial.user_attrs.get("reason", "")
    if reason or trial.state != optuna.trial.TrialState.FAIL:
        return reason
    if trial.number in retries:
        return f"heartbeat: its worker stopped (killed, frozen or cut off); retried as trial {retries[trial.number]}"
    return "heartbeat: its worker stopped (killed, frozen or cut off) before recording why"


def _row(trial: optuna.trial.FrozenTrial, test: dict | None, retries: dict[int, int]) -> dict:
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
        "test_accuracy": test["test_accuracy"] if test is not None and test.get("trial") == trial.number else None,
        "backbone": params.get("backbone"),
        "pretrained": attrs.get("pretrained"),
        "frozen_stages": attrs.get("frozen_stages", params.get("frozen_stages")),
        "num_stages": attrs.get("num_stages"),
        "head": head,
        "head_hidden": params.get("head_hidden") if head == "mlp" else None,
        "head_dropout": params.get("head_dropout", attrs.get("head_dropout")) if head == "mlp" else None,
        "head_init": attrs.get("head_init"),  # probe: the converged probe (whole backbone frozen) or LP-FT's start
        "lr": params.get("lr", attrs.get("lr")),
        "optimizer": params.get("optimizer"),
        "epochs": attrs.get("epochs_done", len(trial.intermediate_values)),
        "trainable_params": attrs.get("trainable_params"),
        "total_params": attrs.get("total_params"),
        "duration_s": round(duration, 2) if duration is not None else None,
        "image_size": attrs.get("image_size"),
        "cache": attrs.get("cache"),
        "reason": _reason(trial, retries),
    }


def retried_from(trial: optuna.trial.FrozenTrial) -> int:
    """The trial this retry directly replaces. Optuna's `failed_trial` names the first of a chain of
    retries (it is carried over); `retry_history` ends with the direct predecessor."""
    history = trial.system_attrs.get("retry_history") or [trial.system_attrs["failed_trial"]]
    return int(history[-1])


def leaderboard_frame(study: optuna.Study) -> pd.DataFrame:
    """Completed trials ranked by validation accuracy, then pruned, running and failed ones."""
    from .holdout import stored_score

    test = stored_score(study)
    trials = study.get_trials(deepcopy=False)
    retries = {retried_from(t): t.number for t in trials if "failed_trial" in t.system_attrs}
    rows = [_row(t, test, retries) for t in trials]
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


BACKBONE_COLUMNS = ["backbone", "pretrained", "best_val_accuracy", "best_trial", "complete", "pruned", "failed",
                    "mean_duration_s"]


def per_backbone(frame: pd.DataFrame) -> pd.DataFrame:
    """Best validation accuracy reached by each (backbone, weights) pair: the comparison a transfer
    search is for, e.g. an in-house pretrained source against random init."""
    if frame.empty:
        return pd.DataFrame(columns=BACKBONE_COLUMNS)
    rows = []
    for (backbone, pretrained), group in frame.groupby(["backbone", "pretrained"], sort=False, dropna=False):
        complete = group[group["state"] == "COMPLETE"]
        accuracy = pd.to_numeric(complete["val_accuracy"], errors="coerce")
        best = accuracy.idxmax() if accuracy.notna().any() else None
        rows.append({
            "backbone": backbone, "pretrained": pretrained,
            "best_val_accuracy": None if best is None else float(accuracy[best]),
            "best_trial": None if best is None else int(complete.loc[best, "trial"]),
            "complete": len(complete), "pruned": int((group["state"] == "PRUNED").sum()),
            "failed": int((group["state"] == "FAIL").sum()),
            "mean_duration_s": round(float(pd.to_numeric(group["duration_s"], errors="coerce").mean()), 2),
        })
    table = pd.DataFrame(rows, columns=BACKBONE_COLUMNS)
    table["_acc"] = pd.to_numeric(table["best_val_accuracy"], errors="coerce").fillna(-1.0)
    table = table.sort_values("_acc", ascending=False, kind="stable").drop(columns="_acc").reset_index(drop=True)
    table["best_trial"] = table["best_trial"].astype("Int64")
    return table


def to_markdown(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    formats = {"val_accuracy": "{:.4f}", "test_accuracy": "{:.4f}", "best_val_accuracy": "{:.4f}", "lr": "{:.2e}", "head_dropout": "{:.2f}"}
    for column, fmt in formats.items():
        if column in shown:
            shown[column] = pd.to_numeric(shown[column], errors="coerce").map(
                lambda v, fmt=fmt: "" if pd.isna(v) else fmt.format(v))
    return shown.astype(object).where(shown.notna(), "").to_markdown(index=False, disable_numparse=True)


def write(frame: pd.DataFrame, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "leaderboard.csv", index=False)
    (out / "leaderboard.md").write_text(to_markdown(frame) + "\n")
    per_backbone(frame).to_csv(out / "per_backbone.csv", index=False)
