"""How much a trial's value depends on the rule that picks it: its last epoch or its best epoch.

Reads every study database under the given folders (e.g. a `bench run --work` folder) and, for each
completed trial that trained more than one epoch, compares the last epoch's val accuracy (the rule
autotransfer uses: the value is what the saved weights give) with the best epoch's. Writes one row
per study to a CSV: how many trials would change, by how much, and whether the chosen trial would.

    python benchmarks/trial_value.py /tmp/bench-j --out benchmarks/results/trial_value.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import optuna
from optuna.trial import TrialState

FIELDS = ["study_db", "trials_multi_epoch", "best_epoch_above_last", "mean_gap", "max_gap",
          "chosen_by_last", "chosen_by_best_epoch", "choice_changes", "pruned_after_last_epoch"]


def study_row(db: Path, epochs: int | None = None) -> dict | None:
    storage = f"sqlite:///{db}"
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        return None
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    multi = [t for t in complete if len(t.intermediate_values) > 1]
    gaps = [max(t.intermediate_values.values()) - t.value for t in multi]
    by_last = max(complete, key=lambda t: t.value, default=None)
    by_best = max(complete, key=lambda t: max(t.intermediate_values.values(), default=t.value), default=None)
    planned = epochs or max((len(t.intermediate_values) for t in trials), default=0)
    pruned_late = sum(t.state == TrialState.PRUNED and len(t.intermediate_values) >= planned for t in trials)
    return {
        "study_db": str(db), "trials_multi_epoch": len(multi),
        "best_epoch_above_last": sum(g > 0 for g in gaps),
        "mean_gap": round(sum(gaps) / len(gaps), 4) if gaps else 0.0,
        "max_gap": round(max(gaps), 4) if gaps else 0.0,
        "chosen_by_last": by_last.number if by_last else None,
        "chosen_by_best_epoch": by_best.number if by_best else None,
        "choice_changes": bool(by_last and by_best and by_last.number != by_best.number),
        "pruned_after_last_epoch": pruned_late,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = [row for folder in args.folders for db in sorted(folder.rglob("study.db"))
            if (row := study_row(db)) is not None]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    multi = sum(r["trials_multi_epoch"] for r in rows)
    above = sum(r["best_epoch_above_last"] for r in rows)
    print(f"{len(rows)} studies, {multi} multi-epoch trials: best epoch above last in {above}; "
          f"choice changes in {sum(r['choice_changes'] for r in rows)} studies; wrote {args.out}")


if __name__ == "__main__":
    main()
