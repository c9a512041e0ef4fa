"""A search's HTML report (`<out>/report.html`): one self-contained page a person reads instead of the CSV.

Invariant: the page is rebuilt from the Optuna storage and `<out>/confusion.json` alone, so
`autotransfer report` reproduces it without the dataset. Only `compute_confusions` reads images (the
chosen model's predictions on val and test, through the predict path), and it stores what it counts
in `confusion.json`, keyed by trial number (not in best/, which each model save replaces whole).
The page works offline: plotly.js is embedded once in its head and every figure refers to it; a plot
that a small or one-valued study cannot draw is replaced by a sentence saying why, and without
plotly the page still holds the tables and confusion matrices. Writing a report never fails a
search: the CLI turns any exception here into one warning line.
"""

from __future__ import annotations

import html
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import optuna
import pandas as pd

from . import leaderboard
from .config import CONFIG_ATTR
from .data import ImageRef, ImageSet
from .holdout import saved_trial, stored_score
from .search import BEST_DIR

REPORT_FILE = "report.html"
CONFUSION_FILE = "confusion.json"
PLOTS_NEED = "pip install 'autotransfer[report]'"
TOP_ROWS = 10
PLOT_HEIGHT = "480px"
TOP_COLUMNS = ["rank", "trial", "state", "val_accuracy", "test_accuracy", "backbone", "pretrained", "frozen_stages",
               "head", "lr", "optimizer", "epochs", "duration_s"]
FORMATS = {"val_accuracy": "{:.4f}", "test_accuracy": "{:.4f}", "best_val_accuracy": "{:.4f}", "lr": "{:.2e}",
           "mean_duration_s": "{:.2f}", "duration_s": "{:.2f}"}
SplitInput = Union[ImageSet, tuple[Sequence[ImageRef], np.ndarray]]  # decoded images, or refs and labels


# --------------------------------------------------------------------------- confusion matrices

@dataclass(frozen=True)
class Confusion:
    """How often each true class (row) was predicted as each class (column) on one split."""

    split: str
    trial: int
    class_names: list[str]
    matrix: list[list[int]]

    @property
    def total(self) -> int:
        return int(sum(map(sum, self.matrix)))

    @property
    def accuracy(self) -> float:
        return sum(self.matrix[i][i] for i in range(len(self.matrix))) / max(self.total, 1)

    def to_dict(self) -> dict:
        return {"class_names": list(self.class_names), "matrix": self.matrix}


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> list[list[int]]:
    """Counts[true][predicted] of two label vectors."""
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    counts = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(int).tolist()


def compute_confusions(best_dir: Path, splits: dict[str, SplitInput], registries, device) -> list[Confusion]:
    """The saved model's confusion matrix on each split, through `predict.label_images`: decoded
    `ImageSet`s at the model's decode size, or (refs, labels) decoded here as `predict` decodes files."""
    from .predict import decode_chunks, label_images
    from .model import load_model
    from .resilience import best_lock

    with best_lock(Path(best_dir)):  # another worker may be publishing a better model right now
        model, card = load_model(Path(best_dir), registries)
    model.to(device)
    found = []
    for split, given in splits.items():
        if isinstance(given, ImageSet):
            if given.decode_size != card.decode_size:
                raise ValueError(f"{split} images decoded at {given.decode_size} px; the model reads "
                                 f"{card.decode_size} px")
            parts = [given]
        else:
            refs, labels = given
            parts = [chunk for _, chunk in decode_chunks(refs, card.decode_size, np.asarray(labels))]
        truth, guesses = [], []
        for part in parts:
            if len(part):
                guesses.append(label_images(model, card, part, device).argmax(dim=1).numpy())
                truth.append(part.labels.cpu().numpy())
        if truth:
            matrix = confusion_matrix(np.concatenate(truth), np.concatenate(guesses), card.num_classes)
            found.append(Confusion(split, int(card.trial), list(card.class_names), matrix))
    return found


def store_confusions(out: Path, confusions: Sequence[Confusion]) -> Path:
    """Add `confusions` to `<out>/confusion.json` ({trial: {split: {class_names, matrix}}}), atomically."""
    path = Path(out) / CONFUSION_FILE
    stored = _read_json(path)
    for confusion in confusions:
        stored.setdefault(str(confusion.trial), {})[confusion.split] = confusion.to_dict()
    staging = path.with_name(f".{CONFUSION_FILE}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(stored) + "\n")
    os.replace(staging, path)
    return path


def load_confusions(out: Path, trial: int) -> list[Confusion]:
    """The confusion matrices stored for `trial`, val first."""
    entry = _read_json(Path(out) / CONFUSION_FILE).get(str(trial), {})
    order = sorted(entry, key=lambda split: ({"val": 0, "test": 1}.get(split, 2), split))
    return [Confusion(split, trial, list(entry[split]["class_names"]), entry[split]["matrix"]) for split in order]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text())
    return value if isinstance(value, dict) else {}


def splits_again(config, registries, decode_size: int, data_cache: Path | None = None) -> dict[str, SplitInput]:
    """The val and test splits read again, exactly as the search split them (same source, seed and
    fraction): for a search whose parent released its data to worker processes (which left the pixels
    in `data_cache`, when there is one)."""
    from .data import PixelCache, prepare
    from .prepared import load_source

    data = prepare(load_source(config, registries), decode_size, val_fraction=config.val_fraction, seed=config.seed,
                   cache=None if data_cache is None else PixelCache(Path(data_cache)))
    return {"val": data.val, **({"test": data.test} if data.test is not None else {})}


# --------------------------------------------------------------------------- what the page says

@dataclass(frozen=True)
class Summary:
    """The header: the study, its trials and the chosen one."""

    study: str
    dataset: str | None
    complete: int
    pruned: int
    failed: int
    chosen: int | None  # the trial in best/ (the leaderboard's first complete one without a saved model)
    val_accuracy: float | None
    test: dict | None  # the stored test score, when it belongs to the chosen trial


def summarize(study: optuna.Study, frame: pd.DataFrame, best_dir: Path | None) -> Summary:
    states = frame["state"].value_counts() if len(frame) else pd.Series(dtype=int)
    complete = frame[frame["state"] == "COMPLETE"]
    saved = saved_trial(best_dir) if best_dir is not None else None
    rows = complete[complete["trial"] == saved] if saved is not None else complete.iloc[:0]
    best = rows.iloc[0] if len(rows) else (complete.iloc[0] if len(complete) else None)
    chosen = None if best is None else int(best["trial"])
    test = stored_score(study)
    config = study.user_attrs.get(CONFIG_ATTR) or {}
    return Summary(study.study_name, config.get("dataset"), int(states.get("COMPLETE", 0)),
                   int(states.get("PRUNED", 0)), int(states.get("FAIL", 0)), chosen,
                   None if best is None else float(best["val_accuracy"]),
                   test if test is not None and chosen is not None and test.get("trial") == chosen else None)


DEPTH_COLUMNS = ["backbone", "frozen_stages", "num_stages", "best_val_accuracy", "best_trial", "complete", "pruned",
                 "failed"]


def per_depth(frame: pd.DataFrame) -> pd.DataFrame:
    """Best validation accuracy per backbone and number of frozen stages: how deep to freeze each one."""
    if frame.empty:
        return pd.DataFrame(columns=DEPTH_COLUMNS)
    rows = []
    for (backbone, depth), group in frame.groupby(["backbone", "frozen_stages"], sort=True, dropna=False):
        stages = pd.to_numeric(group["num_stages"], errors="coerce").dropna()
        rows.append({"backbone": backbone, "frozen_stages": depth,
                     "num_stages": int(stages.iloc[0]) if len(stages) else None, **leaderboard.group_best(group)})
    table = pd.DataFrame(rows, columns=DEPTH_COLUMNS)
    for column in ("frozen_stages", "num_stages", "best_trial"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    return table


@dataclass(frozen=True)
class Plot:
    """One of Optuna's figures as an HTML div, or the sentence that says why it is absent."""

    key: str
    title: str
    div: str | None
    absent: str = ""


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _why_no_history(study: optuna.Study) -> str | None:
    return None if _complete(study) else "No trial has completed yet, so there is no history to plot."


def _why_no_importances(study: optuna.Study) -> str | None:
    complete = _complete(study)
    if len(complete) < 2:
        return (f"Parameter importances need at least two completed trials; this study has {len(complete)}, "
                "so no parameter can be credited with a difference.")
    if not _varied(study):
        return ("Parameter importances need a parameter that differs between completed trials; every parameter "
                "the completed trials share took one value.")
    return None


def _varied(study: optuna.Study) -> list[str]:
    """The parameters every completed trial drew from one distribution and that took more than one value,
    sorted: what importances can be computed for, in an order that does not depend on hashing."""
    complete = _complete(study)
    shared = optuna.search_space.intersection_search_space(complete)
    return sorted(name for name in shared if len({repr(t.params[name]) for t in complete}) > 1)


def _importances(study: optuna.Study):
    """Optuna's importances plot over the varied parameters (by default it takes them in set order, which
    changes from one process to the next when importances tie, so a rebuilt page would differ)."""
    from optuna import visualization

    return visualization.plot_param_importances(study, params=_varied(study))


def _why_no_parallel(study: optuna.Study) -> str | None:
    complete = _complete(study)
    if len(complete) < 2:
        return (f"The parallel coordinate plot needs at least two completed trials to compare; this study has "
                f"{len(complete)}.")
    return None


def plots(study: optuna.Study) -> list[Plot] | str:
    """Optuna's optimization history, parameter importances and parallel coordinate, each drawn only
    when the study can support it; a sentence instead of the list when plotly is missing."""
    try:
        import plotly  # noqa: F401 - optuna.visualization draws with it
        from optuna import visualization
    except ImportError:
        return f"The plots need plotly: {PLOTS_NEED}, then run `autotransfer report` on this folder."
    wanted: list[tuple[str, str, Callable, Callable]] = [
        ("history", "Optimization history", _why_no_history, visualization.plot_optimization_history),
        ("importances", "Parameter importances", _why_no_importances, _importances),
        ("parallel", "Parallel coordinate", _why_no_parallel, visualization.plot_parallel_coordinate),
    ]
    found = []
    for key, title, why_not, draw in wanted:
        absent = why_not(study)
        if absent is not None:
            found.append(Plot(key, title, None, absent))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figure = draw(study)
            div = figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{key}",
                                 default_height=PLOT_HEIGHT, default_width="100%")
        except Exception as exc:  # a plot is a nicety: say why, keep the page
            found.append(Plot(key, title, None, f"Optuna could not draw this plot on this study "
                                                f"({type(exc).__name__}: {_first_line(exc)})."))
        else:
            found.append(Plot(key, title, div))
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- the page

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
.facts td { text-align: left; } .absent { color: #666; font-style: italic; }
table.confusion td { min-width: 2.5em; text-align: center; }
"""


def _table(frame: pd.DataFrame, css: str) -> str:
    shown = frame.copy()
    for column, fmt in FORMATS.items():
        if column in shown:
            shown[column] = pd.to_numeric(shown[column], errors="coerce").map(
                lambda v, fmt=fmt: "" if pd.isna(v) else fmt.format(v))
    shown = shown.astype(object).where(shown.notna(), "")
    return shown.to_html(index=False, escape=True, classes=css, border=0, na_rep="")


def _header(summary: Summary) -> str:
    test = ("no test score stored (the dataset has no test split, or it is not scored yet)" if summary.test is None
            else f"{summary.test['test_accuracy']:.4f} on {summary.test['test_images']} test images "
                 "(scored once, after the choice)")
    chosen = ("none (no trial completed)" if summary.chosen is None
              else f"trial {summary.chosen}, val accuracy {summary.val_accuracy:.4f} (what it was chosen on)")
    facts = [("study", summary.study), ("dataset", summary.dataset or "unknown"),
             ("trials", f"{summary.complete} complete, {summary.pruned} pruned, {summary.failed} failed"),
             ("chosen", chosen), ("test accuracy", test)]
    rows = "".join(f"<tr><th class='name'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    return (f"<h1>autotransfer search: {html.escape(summary.study)}</h1>\n"
            f"<table class='facts' id='summary'>{rows}</table>")


def _confusion_html(confusion: Confusion) -> str:
    names = [html.escape(name) for name in confusion.class_names]
    head = "".join(f"<th>{name}</th>" for name in names)
    body = []
    for i, row in enumerate(confusion.matrix):
        total = max(sum(row), 1)
        cells = []
        for j, count in enumerate(row):
            share = count / total
            colour = f"rgba(46,139,87,{share:.2f})" if i == j else f"rgba(205,92,92,{share:.2f})"
            cells.append(f"<td style='background:{colour}'>{count}</td>")
        body.append(f"<tr><th class='name'>{names[i]}</th>{''.join(cells)}</tr>")
    return (f"<h3>{html.escape(confusion.split)}: {confusion.total} images, accuracy {confusion.accuracy:.4f} "
            f"(trial {confusion.trial})</h3>\n"
            f"<table class='confusion' data-split='{html.escape(confusion.split)}'>"
            f"<tr><th class='name'>true \\ predicted</th>{head}</tr>{''.join(body)}</table>")


def _confusions_section(summary: Summary, confusions: Sequence[Confusion]) -> str:
    parts = ["<h2>Confusion matrices of the chosen model</h2>",
             "<p>Rows are the true classes, columns the predicted ones.</p>"]
    if not confusions:
        which = "no trial was chosen" if summary.chosen is None else (
            f"none is stored for trial {summary.chosen} in {CONFUSION_FILE} (the search that chose it writes them)")
        parts.append(f"<p class='absent'>No confusion matrix: {html.escape(which)}.</p>")
    parts += [_confusion_html(confusion) for confusion in confusions]
    if confusions and not any(c.split == "test" for c in confusions):
        parts.append("<p class='absent'>No test confusion matrix: the dataset has no test split.</p>")
    return "\n".join(parts)


def _plots_section(found: list[Plot] | str) -> tuple[str, bool]:
    """The plots' HTML, and whether any figure needs plotly.js."""
    if isinstance(found, str):
        return f"<h2>Plots</h2>\n<p class='absent'>{html.escape(found)}</p>", False
    parts = []
    for plot in found:
        parts.append(f"<h2>{html.escape(plot.title)}</h2>")
        parts.append(plot.div if plot.div is not None else
                     f"<p class='absent' id='absent-{plot.key}'>{html.escape(plot.absent)}</p>")
    return "\n".join(parts), any(plot.div is not None for plot in found)


def _shown_rows(trials: int) -> str:
    return f"all {trials} trials" if trials <= TOP_ROWS else f"first {TOP_ROWS} of {trials} trials"


def render(study: optuna.Study, frame: pd.DataFrame, summary: Summary, confusions: Sequence[Confusion]) -> str:
    """The whole page as a string."""
    plot_html, needs_js = _plots_section(plots(study))
    script = ""
    if needs_js:
        from plotly.offline import get_plotlyjs

        script = f"<script type='text/javascript'>{get_plotlyjs()}</script>"
    top = frame[[c for c in TOP_COLUMNS if c in frame]].head(TOP_ROWS)
    sections = [
        _header(summary),
        plot_html,
        "<h2>Best val accuracy per backbone</h2>", _table(leaderboard.per_backbone(frame), "per-backbone"),
        "<h2>Best val accuracy per backbone and frozen depth</h2>",
        "<p>frozen_stages of num_stages: 0 trains the whole backbone, num_stages only the head.</p>",
        _table(per_depth(frame), "per-depth"),
        _confusions_section(summary, confusions),
        f"<h2>Leaderboard ({_shown_rows(len(frame))}; every column in leaderboard.csv)</h2>",
        _table(top, "leaderboard"),
    ]
    title = html.escape(f"autotransfer report: {summary.study}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"{script}</head>\n<body>\n" + "\n".join(sections) + "\n</body></html>\n")


def write_report(study: optuna.Study, out_dir: Path, *, run_dir: Path | None = None,
                 confusions: Sequence[Confusion] | None = None) -> Path:
    """Write `<out_dir>/report.html` (atomically) from the study and what the search left in `run_dir`
    (default `out_dir`): best/, which names the chosen trial, and the confusion matrices confusion.json
    holds for it (or `confusions` when given). Return the page's path."""
    out_dir = Path(out_dir)
    run_dir = out_dir if run_dir is None else Path(run_dir)
    frame = leaderboard.leaderboard_frame(study)
    summary = summarize(study, frame, run_dir / BEST_DIR)
    if confusions is None:
        confusions = [] if summary.chosen is None else load_confusions(run_dir, summary.chosen)
    page = render(study, frame, summary, confusions)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    staging = path.with_name(f".{REPORT_FILE}.{os.getpid()}.tmp")
    staging.write_text(page, encoding="utf-8")
    os.replace(staging, path)
    return path
