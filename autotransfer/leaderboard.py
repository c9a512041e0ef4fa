"""The leaderboard: one row per trial, best first, rebuilt from the Optuna storage alone.

Rows are ranked by `val_accuracy`, the number the search chose with. `test_accuracy` is filled on
one row only, the chosen trial's, once it has been scored on the test split (holdout.py); it
never takes part in the ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from .record import INTERRUPTED, TrialRecord

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "INTERRUPTED": 4, "FAIL": 5}


@dataclass(frozen=True)
class Row:
    """What a column reads: the trial, its record (record.py), the stored test score and the retries."""

    trial: FrozenTrial
    record: TrialRecord
    test: dict | None
    retries: dict[int, int]

    @property
    def mlp(self) -> bool:
        return self.trial.params.get("head") == "mlp"


@dataclass(frozen=True)
class Column:
    name: str
    value: Callable[[Row], Any]
    integer: bool = False  # a nullable integer column (pandas Int64)


def _accuracy(row: Row) -> float | None:
    trial = row.trial
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def _test(row: Row) -> float | None:
    return row.test["test_accuracy"] if row.test is not None and row.test.get("trial") == row.trial.number else None


def _duration(row: Row) -> float | None:
    trial, duration = row.trial, row.record.duration_s
    if duration is None and trial.datetime_complete and trial.datetime_start:
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return round(duration, 2) if duration is not None else None


def _interrupted(row: Row) -> bool:
    return row.trial.state == TrialState.FAIL and row.record.reason.startswith(INTERRUPTED)


def _state(row: Row) -> str:
    """Optuna's state, except that a trial stopped by the user reads INTERRUPTED, not FAIL: it is no
    failure, and it is not counted as one (Optuna stores it as FAIL so that it can be retried)."""
    return "INTERRUPTED" if _interrupted(row) else row.trial.state.name


def _reason(row: Row) -> str:
    """The recorded reason; a failed trial without one was failed by the storage's heartbeat check
    (its worker was killed, frozen or cut off before it could record anything)."""
    trial, reason = row.trial, row.record.reason
    if _interrupted(row) and trial.number in row.retries:
        return f"{INTERRUPTED}: stopped by the user; resumed from its checkpoint as trial {row.retries[trial.number]}"
    if reason or trial.state != TrialState.FAIL:
        return reason
    if trial.number in row.retries:
        return f"heartbeat: its worker stopped (killed, frozen or cut off); retried as trial {row.retries[trial.number]}"
    return "heartbeat: its worker stopped (killed, frozen or cut off) before recording why"


def _param(name: str) -> Callable[[Row], Any]:
    return lambda row: row.trial.params.get(name)


# The leaderboard, column by column (after "rank"): adding a column is adding its line here.
TABLE = [
    Column("trial", lambda row: row.trial.number),
    Column("state", _state),
    Column("val_accuracy", _accuracy),
    Column("test_accuracy", _test),
    Column("backbone", _param("backbone")),
    Column("pretrained", lambda row: row.record.pretrained),
    Column("frozen_stages", lambda row: row.trial.params.get("frozen_stages") if row.record.frozen_stages is None
           else row.record.frozen_stages, integer=True),
    Column("num_stages", lambda row: row.record.num_stages, integer=True),
    Column("head", _param("head")),
    Column("head_hidden", lambda row: row.trial.params.get("head_hidden") if row.mlp else None, integer=True),
    Column("head_dropout", lambda row: (row.trial.params.get("head_dropout", row.record.head_dropout)
                                        if row.mlp else None)),
    Column("head_init", lambda row: row.record.head_init),  # probe: the converged probe, or LP-FT's start
    Column("features", _param("features")),  # a fully frozen trial's: final, or every stage's (multilevel.py)
    Column("probe_c", lambda row: row.record.probe_c),  # the probe's L2 strength (CV's choice, or the drawn one)
    Column("lr", lambda row: row.trial.params.get("lr", row.record.lr)),
    Column("optimizer", _param("optimizer")),
    Column("epochs", lambda row: (len(row.trial.intermediate_values) if row.record.epochs_done is None
                                  else row.record.epochs_done), integer=True),
    Column("trainable_params", lambda row: row.record.trainable_params, integer=True),
    Column("total_params", lambda row: row.record.total_params, integer=True),
    Column("duration_s", _duration),
    Column("image_size", lambda row: row.record.image_size, integer=True),
    Column("cache", lambda row: row.record.cache),
    Column("opening", lambda row: row.record.portfolio),  # the opening recipe it ran as (portfolio.py), if any
    Column("reason", _reason),
]
COLUMNS = ["rank", *(column.name for column in TABLE)]


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
    rows = [Row(t, TrialRecord.of(t), test, retries) for t in trials]
    frame = pd.DataFrame([{column.name: column.value(row) for column in TABLE} for row in rows], columns=COLUMNS[1:])
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    frame["_order"] = frame["state"].map(STATE_ORDER).fillna(9)
    frame["_acc"] = pd.to_numeric(frame["val_accuracy"], errors="coerce").fillna(-1.0)
    frame = frame.sort_values(["_order", "_acc", "trial"], ascending=[True, False, True], kind="stable")
    frame = frame.drop(columns=["_order", "_acc"]).reset_index(drop=True)
    complete = frame["state"] == "COMPLETE"
    frame.insert(0, "rank", pd.array([i + 1 if c else None for i, c in enumerate(complete)], dtype="Int64"))
    for column in TABLE:
        if column.integer:
            frame[column.name] = pd.to_numeric(frame[column.name], errors="coerce").astype("Int64")
    return frame


BACKBONE_COLUMNS = ["backbone", "pretrained", "best_val_accuracy", "best_trial", "complete", "pruned", "failed",
                    "mean_duration_s"]


def group_best(group: pd.DataFrame) -> dict:
    """A group of leaderboard rows in one summary: its best val accuracy and trial, and its counts."""
    complete = group[group["state"] == "COMPLETE"]
    accuracy = pd.to_numeric(complete["val_accuracy"], errors="coerce")
    best = accuracy.idxmax() if accuracy.notna().any() else None
    return {"best_val_accuracy": None if best is None else float(accuracy[best]),
            "best_trial": None if best is None else int(complete.loc[best, "trial"]),
            "complete": len(complete), "pruned": int((group["state"] == "PRUNED").sum()),
            "failed": int((group["state"] == "FAIL").sum())}


def per_backbone(frame: pd.DataFrame) -> pd.DataFrame:
    """Best validation accuracy reached by each (backbone, weights) pair: the comparison a transfer
    search is for, e.g. an in-house pretrained source against random init."""
    if frame.empty:
        return pd.DataFrame(columns=BACKBONE_COLUMNS)
    rows = [{"backbone": backbone, "pretrained": pretrained, **group_best(group),
             "mean_duration_s": round(float(pd.to_numeric(group["duration_s"], errors="coerce").mean()), 2)}
            for (backbone, pretrained), group in frame.groupby(["backbone", "pretrained"], sort=False, dropna=False)]
    table = pd.DataFrame(rows, columns=BACKBONE_COLUMNS)
    table["_acc"] = pd.to_numeric(table["best_val_accuracy"], errors="coerce").fillna(-1.0)
    table = table.sort_values("_acc", ascending=False, kind="stable").drop(columns="_acc").reset_index(drop=True)
    table["best_trial"] = table["best_trial"].astype("Int64")
    return table


TERMINAL_COLUMNS = ["rank", "trial", "state", "val_accuracy", "test_accuracy", "backbone", "pretrained", "frozen",
                    "head", "lr", "optimizer", "epochs", "duration_s", "reason"]
TERMINAL_NAMES = {"val_accuracy": "val_acc", "test_accuracy": "test_acc", "pretrained": "weights", "duration_s": "s",
                  "optimizer": "opt"}
REASON_WIDTH = 48


def terminal(frame: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as a terminal shows it: the columns a choice is read from, frozen depth as k/n,
    the head in one word, the reason of failed and interrupted trials cut short (leaderboard.csv and .md
    keep every column, in full)."""
    if frame.empty:
        return pd.DataFrame(columns=TERMINAL_COLUMNS)
    shown = frame.copy()
    shown["frozen"] = [f"{f}/{n}" if pd.notna(f) and pd.notna(n) else ("" if pd.isna(f) else str(f))
                       for f, n in zip(shown["frozen_stages"], shown["num_stages"])]
    shown["head"] = [_head_word(row) for row in shown.itertuples()]
    shown["reason"] = ["" if state in ("COMPLETE", "PRUNED") or not isinstance(r, str)  # pruned: `epochs` says when
                       else r if len(r) <= REASON_WIDTH else r[:REASON_WIDTH - 3] + "..."
                       for state, r in zip(shown["state"], shown["reason"])]
    return shown[TERMINAL_COLUMNS].rename(columns=TERMINAL_NAMES)


def _head_word(row) -> str:
    if not isinstance(row.head, str):
        return ""
    fully_frozen = pd.notna(row.frozen_stages) and pd.notna(row.num_stages) and row.frozen_stages == row.num_stages
    if row.head_init == "probe" and fully_frozen:
        return "probe" + (" (stages)" if row.features == "stages" else "")
    word = row.head + (f"({int(row.head_hidden)})" if row.head == "mlp" and pd.notna(row.head_hidden) else "")
    return word + (" lp-ft" if row.head_init == "probe" else "")


def to_markdown(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    formats = {"val_accuracy": "{:.4f}", "test_accuracy": "{:.4f}", "best_val_accuracy": "{:.4f}", "lr": "{:.2e}",
               "head_dropout": "{:.2f}", "val_acc": "{:.4f}", "test_acc": "{:.4f}", "s": "{:.1f}"}
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
