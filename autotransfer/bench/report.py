"""`autotransfer bench report`: leaderboards, plots, history and regression flags from the store.

One HTML page with every plot embedded (base64 PNG, so it can be mailed or archived as one file)
and a Markdown twin that references the same plots as PNG files beside it.

Every method chose its model on validation accuracy, so that number is optimistic; the report ranks,
plots and flags on test accuracy (the chosen model scored on a split no selection saw) and shows
val beside it. A test number is never stood in for by a val number: where a section has no test
numbers at all (stores from before the test split) its plots say "(val)".
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import UserError
from .store import COLUMNS

NUMERIC = ("seed", "best_val_accuracy", "test_accuracy", "test_images", "time_to_best_s", "wall_s", "trials_complete",
           "trials_pruned", "trials_failed")
NOTE = ("Ranked by mean test accuracy: the model each method chose on validation, scored on a test split no "
        "selection saw. Val is the number each method selected on, so it is optimistic.")


@dataclass
class ReportRequest:
    results: Path = Path("benchmarks/results")
    suite: str | None = None
    out: Path = Path("benchmarks/results/report.html")
    threshold: float = 2.0  # accuracy drop that is a regression, in percentage points
    slowdown: float = 0.25  # wall-time growth that is a regression, as a fraction


@dataclass
class Section:
    """One (suite, dataset): the latest night's leaderboard, its plots and the history."""

    suite: str
    dataset: str
    night: str
    leaderboard: pd.DataFrame
    history: pd.DataFrame  # night x method: mean test accuracy %, NaN where a night has no test numbers
    val_history: pd.DataFrame  # night x method: mean val accuracy %
    flags: list[str]
    plots: dict[str, bytes] = field(default_factory=dict)  # caption -> PNG
    label: str = ""  # the short name headings and plot files use; the dataset as written when empty

    @property
    def name(self) -> str:
        return self.label or self.dataset


def dataset_label(dataset: str) -> str:
    """A short name for headings and files: a folder's or file's own name; `builtin:` and URLs as written."""
    if re.match(r"^[A-Za-z][\w+.-]+:", dataset):
        return dataset
    return Path(dataset.rstrip("/\\")).name or dataset


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("the report needs matplotlib: pip install autotransfer[bench]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_results(results: Path, suite: str | None) -> pd.DataFrame:
    """Every store in `results` (other CSVs there, e.g. other benchmarks' outputs, are ignored)."""
    paths = [results / f"{suite}.csv"] if suite else sorted(results.glob("*.csv"))
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False).reindex(columns=COLUMNS, fill_value="")
              for p in paths if p.is_file() and _is_store(p)]  # older stores: the columns they lack are empty
    if not frames:
        what = f"no store {results / f'{suite}.csv'}" if suite else f"no benchmark store (*.csv with a run_id column) in {results}"
        raise UserError(f"{what}; run `autotransfer bench run SUITE --results {results}` first")
    frame = pd.concat(frames, ignore_index=True)
    for column in NUMERIC:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _is_store(path: Path) -> bool:
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    return {"run_id", "night", "method", "best_val_accuracy"} <= set(header) and set(header) <= set(COLUMNS)


def method_means(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method: test and val accuracy (in %) mean and std over seeds, mean times; rows with an error
    excluded; test_mean is NaN for a method without test numbers."""
    ok = rows[(rows["error"] == "") & rows["best_val_accuracy"].notna()]
    grouped = ok.groupby("method")
    frame = pd.DataFrame({
        "test_mean": grouped["test_accuracy"].mean() * 100,
        "test_std": grouped["test_accuracy"].std(ddof=0) * 100,
        "val_mean": grouped["best_val_accuracy"].mean() * 100,
        "val_std": grouped["best_val_accuracy"].std(ddof=0) * 100,
        "seeds": grouped["seed"].nunique(),
        "time_to_best_s": grouped["time_to_best_s"].mean(),
        "wall_s": grouped["wall_s"].mean(),
    })
    errors = rows[rows["error"] != ""].groupby("method").size()
    methods = sorted(set(rows["method"]))
    frame = frame.reindex(methods)
    frame["errors"] = errors.reindex(methods).fillna(0).astype(int)
    return frame


def regressions(latest: pd.DataFrame, previous: pd.DataFrame | None, threshold: float, slowdown: float) -> dict[str, str]:
    """method -> why it regressed: test accuracy (points) against `previous.test_mean`, success and wall time
    (a fraction) against `previous.val_mean` and `previous.wall_s` (see `_previous_means`). Val accuracy
    never flags: a method may trade val for test."""
    if previous is None:
        return {}
    found = {}
    for method, now in latest.iterrows():
        if method not in previous.index:
            continue
        before = previous.loc[method]
        reasons = []
        if pd.isna(now["val_mean"]):
            if pd.notna(before["val_mean"]):
                reasons.append("no successful run")
        elif pd.notna(before["test_mean"]):
            if pd.isna(now["test_mean"]):
                reasons.append("no test accuracy")
            elif before["test_mean"] - now["test_mean"] > threshold:
                reasons.append(f"accuracy {now['test_mean'] - before['test_mean']:+.2f} pts on test")
        if before["wall_s"] > 0 and now["wall_s"] > before["wall_s"] * (1 + slowdown):
            reasons.append(f"wall time {now['wall_s'] / before['wall_s'] - 1:+.0%}")
        if reasons:
            found[method] = "; ".join(reasons)
    return found


def build_section(rows: pd.DataFrame, suite: str, dataset: str, threshold: float, slowdown: float) -> Section:
    nights = sorted(rows["night"].unique())
    latest_night = nights[-1]
    latest = method_means(rows[rows["night"] == latest_night])
    previous = None
    if len(nights) > 1:
        previous = _previous_means(rows, nights[:-1], list(latest.index))
    flags = regressions(latest, previous, threshold, slowdown)
    board = leaderboard_table(latest, flags)
    history, val_history = night_means(rows, "test_accuracy"), night_means(rows, "best_val_accuracy")
    section = Section(suite, dataset, latest_night, board, history, val_history,
                      [f"{suite} / {dataset} / {m}: {why}" for m, why in flags.items()])
    plt = _pyplot()
    section.plots["accuracy vs wall time"] = anytime_plot(plt, rows[rows["night"] == latest_night], dataset_label(dataset))
    section.plots["history"] = history_plot(plt, history, val_history, dataset_label(dataset))
    return section


def night_means(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """night x method: the mean of `column` in %, over the rows without an error; NaN where there is none."""
    ok = rows[rows["error"] == ""]
    return ok.groupby(["night", "method"])[column].mean().mul(100).unstack("method").sort_index()


def _previous_means(rows: pd.DataFrame, earlier: list[str], methods: list[str]) -> pd.DataFrame:
    """For each method that ran before: val_mean and wall_s of the most recent earlier night it ran, and
    test_mean of the most recent earlier night it has test numbers (NaN when no earlier night has)."""
    found = {}
    for method in methods:
        mine = rows[(rows["method"] == method) & rows["night"].isin(earlier)]
        if not len(mine):
            continue
        means = {night: method_means(group).loc[method] for night, group in mine.groupby("night")}
        last = means[max(means)]
        tested = [means[night]["test_mean"] for night in sorted(means) if pd.notna(means[night]["test_mean"])]
        found[method] = {"test_mean": tested[-1] if tested else math.nan, "val_mean": last["val_mean"],
                         "wall_s": last["wall_s"]}
    return pd.DataFrame.from_dict(found, orient="index", columns=["test_mean", "val_mean", "wall_s"], dtype=float)


def leaderboard_table(means: pd.DataFrame, flags: dict[str, str]) -> pd.DataFrame:
    """Methods by mean test accuracy (none last), then by mean val accuracy."""
    ordered = means.sort_values(["test_mean", "val_mean"], ascending=False, na_position="last")
    return pd.DataFrame({
        "rank": range(1, len(ordered) + 1),
        "method": ordered.index,
        "test acc % (mean ± std)": [_pm(m, s) for m, s in zip(ordered["test_mean"], ordered["test_std"])],
        "val acc % (mean ± std)": [_pm(m, s) for m, s in zip(ordered["val_mean"], ordered["val_std"])],
        "seeds": ordered["seeds"].fillna(0).astype(int).to_numpy(),
        "time to best s": [_num(v) for v in ordered["time_to_best_s"]],
        "wall s": [_num(v) for v in ordered["wall_s"]],
        "errors": ordered["errors"].to_numpy(),
        "flag": ["REGRESSION: " + flags[m] if m in flags else "" for m in ordered.index],
    })


def _pm(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.2f} ± {0.0 if pd.isna(std) else std:.2f}"


def _num(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def anytime_plot(plt, rows: pd.DataFrame, dataset: str) -> bytes:
    """Test accuracy of the best-by-val model so far against elapsed time, one step line per (method,
    seed), ending at the run's wall time (see `anytime_lines`); up and left is better."""
    metric, lines = anytime_lines(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(method for method, _ in lines))
    labelled: set[str] = set()
    for method, points in lines:
        colour = colours[methods.index(method) % len(colours)]
        label = None if method in labelled else method
        labelled.add(method)
        if len(points) > 1:
            ax.plot(*zip(*points), drawstyle="steps-post", color=colour, alpha=0.8, label=label)
            ax.scatter(*points[-1], color=colour, s=16)
        else:
            ax.scatter(*points[0], color=colour, s=36, alpha=0.8, label=label)
    ax.set_xlabel("wall time (s)")
    if metric == "test":
        ax.set_ylabel("test acc. of best-by-val model so far (%)")
        ax.set_title(f"{dataset}: test accuracy vs wall time", fontsize=10)
    else:
        ax.set_ylabel("best val accuracy so far (%) (val)")
        ax.set_title(f"{dataset}: accuracy vs wall time (val)", fontsize=10)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    return _png(plt, fig)


def anytime_lines(rows: pd.DataFrame) -> tuple[str, list[tuple[str, list[tuple[float, float]]]]]:
    """("test" or "val", [(method, points)]) for the rows without an error, by method. Test when any row
    has a test number; then a row without one is left out, never drawn with its val numbers. Val only
    when no row has a test number (stores from before the test split)."""
    ok = rows[rows["error"] == ""].sort_values(["method", "seed"], kind="stable")
    for metric in ("test", "val"):
        lines = [(row["method"], points) for _, row in ok.iterrows() if (points := run_curve(row, metric))]
        if lines:
            return metric, lines
    return "test", []


def run_curve(row: pd.Series, metric: str = "test") -> list[tuple[float, float]]:
    """(seconds, accuracy %) steps of one row, closed at its wall time. `metric` "test": the test accuracy
    of the best-by-val model so far (third element of each curve point; points without one, and
    two-element points from before the test split, are skipped); "val": the best val accuracy so far.
    A row without a stored curve is its final number at its wall time; empty when it has none."""
    index, column = {"val": (1, "best_val_accuracy"), "test": (2, "test_accuracy")}[metric]
    stored = json.loads(row["curve"]) if row.get("curve") else []
    points = [(float(p[0]), float(p[index]) * 100) for p in stored if len(p) > index and p[index] is not None]
    wall = row.get("wall_s")
    if not points:
        final = row.get(column)
        return [] if _missing(final) or _missing(wall) else [(float(wall), float(final) * 100)]
    if not _missing(wall) and wall > points[-1][0]:
        points.append((float(wall), points[-1][1]))
    return points


def _missing(value) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def history_plot(plt, history: pd.DataFrame, val_history: pd.DataFrame, dataset: str) -> bytes:
    """Mean test accuracy per night per method; mean val accuracy, marked "(val)", when no night has a
    test number (stores from before the test split)."""
    tested = history.notna().any().any()
    shown = history if tested else val_history
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in shown.columns:
        ax.plot(shown.index, shown[method], marker="o", label=method)
    ax.set_xlabel("night")
    ax.set_ylabel("mean test accuracy (%)" if tested else "mean best val accuracy (%) (val)")
    ax.set_title(f"{dataset}: history" + ("" if tested else " (val)"), fontsize=10)
    ax.grid(alpha=0.3)
    if len(shown.columns):
        ax.legend(fontsize=8)
    fig.autofmt_xdate()
    return _png(plt, fig)


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def sections(frame: pd.DataFrame, threshold: float, slowdown: float) -> list[Section]:
    built = [build_section(rows, suite, dataset, threshold, slowdown)
             for (suite, dataset), rows in frame.groupby(["suite", "dataset"], sort=True)]
    labels = [(section.suite, dataset_label(section.dataset)) for section in built]
    for section, key in zip(built, labels):
        section.label = key[1] if labels.count(key) == 1 else ""  # two folders of one name: keep full paths
    return built


# --------------------------------------------------------------------------- writing

def write_report(request: ReportRequest) -> tuple[Path, Path, list[str]]:
    """Write the HTML page and its Markdown twin; return both paths and the regression lines."""
    _pyplot()  # fail before reading anything when matplotlib is missing
    frame = load_results(request.results, request.suite)
    built = sections(frame, request.threshold, request.slowdown)
    out = request.out
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = out.with_suffix(".md")
    flags = [line for section in built for line in section.flags]
    out.write_text(render_html(built, flags, request))
    markdown.write_text(render_markdown(built, flags, request, out))
    return out, markdown, flags


def plots_folder(out: Path) -> Path:
    """Where the Markdown twin's PNG files go: a folder beside the page, named after it (the HTML page
    embeds its plots and needs no files)."""
    return out.with_name(f"{out.stem}-plots")


def _plot_file(out: Path, section: Section, caption: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{section.suite}-{section.name}-{caption}").strip("-")
    return plots_folder(out) / f"{name}.png"


def _criteria(request: ReportRequest) -> str:
    return (f"REGRESSION: mean test accuracy down more than {request.threshold:g} points against the method's last "
            f"earlier night with test numbers, or mean wall time up more than {request.slowdown:.0%} against the last "
            "earlier night it ran (val accuracy never flags)")


HISTORIES = (("History: mean test accuracy (%) per night", "history"),
             ("History: mean val accuracy (%) per night (selected on, optimistic)", "val_history"))


def _cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers to two decimals, empty where there is none (a night without test numbers)."""
    return frame.apply(lambda column: column.map(lambda v: "" if pd.isna(v) else f"{v:.2f}"))


def render_markdown(built: list[Section], flags: list[str], request: ReportRequest, out: Path) -> str:
    lines = ["# Benchmark report", "", _criteria(request) + ".", ""]
    lines += ["**Regressions:**", *[f"- REGRESSION {f}" for f in flags], ""] if flags else ["No regressions.", ""]
    for section in built:
        lines += [f"## {section.suite} / {section.name}", "",
                  f"Dataset `{section.dataset}`, latest night: {section.night}", "", NOTE, "",
                  section.leaderboard.to_markdown(index=False), ""]
        for caption, png in section.plots.items():
            path = _plot_file(out, section, caption)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
            lines += [f"![{caption}]({path.parent.name}/{path.name})", ""]
        for title, attribute in HISTORIES:
            lines += [f"### {title}", "", _cells(getattr(section, attribute)).to_markdown(disable_numparse=True,
                                                                                       stralign="right"), ""]
    return "\n".join(lines)


STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
         ".regression{color:#b00020;font-weight:bold}img{margin:0.5em 1em 0.5em 0}")


def render_html(built: list[Section], flags: list[str], request: ReportRequest) -> str:
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>Benchmark report</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>Benchmark report</h1>",
             f"<p>{html.escape(_criteria(request))}.</p>"]
    if flags:
        parts += ["<ul>", *[f"<li class=\"regression\">REGRESSION {html.escape(f)}</li>" for f in flags], "</ul>"]
    else:
        parts.append("<p>No regressions.</p>")
    for section in built:
        parts += [f"<h2>{html.escape(section.suite)} / {html.escape(section.name)}</h2>",
                  f"<p>Dataset <code>{html.escape(section.dataset)}</code>, latest night: {html.escape(section.night)}</p>",
                  f"<p>{html.escape(NOTE)}</p>",
                  section.leaderboard.to_html(index=False, classes="leaderboard", border=0)]
        for caption, png in section.plots.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">")
        for title, attribute in HISTORIES:
            parts += [f"<h3>{html.escape(title)}</h3>",
                      _cells(getattr(section, attribute)).to_html(classes="history", border=0)]
    parts.append("</body></html>")
    page = "\n".join(parts)
    return page.replace("<td>REGRESSION", "<td class=\"regression\">REGRESSION")
