"""`autotransfer bench report`: leaderboards, plots, history and regression flags from the store.

One HTML page with every plot embedded (base64 PNG, so it can be mailed or archived as one file)
and a Markdown twin that references the same plots as PNG files beside it.
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

NUMERIC = ("seed", "best_val_accuracy", "time_to_best_s", "wall_s", "trials_complete", "trials_pruned", "trials_failed")


@dataclass
class ReportRequest:
    results: Path = Path("benchmarks/results")
    suite: str | None = None
    out: Path = Path("report.html")
    threshold: float = 2.0  # accuracy drop that is a regression, in percentage points
    slowdown: float = 0.25  # wall-time growth that is a regression, as a fraction


@dataclass
class Section:
    """One (suite, dataset): the latest night's leaderboard, its plots and the history."""

    suite: str
    dataset: str
    night: str
    leaderboard: pd.DataFrame
    history: pd.DataFrame
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
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in paths if p.is_file() and _is_store(p)]
    if not frames:
        what = f"no store {results / f'{suite}.csv'}" if suite else f"no benchmark store (*.csv with a run_id column) in {results}"
        raise UserError(f"{what}; run `autotransfer bench run SUITE --results {results}` first")
    frame = pd.concat(frames, ignore_index=True)
    frame["curve"] = frame["curve"].fillna("") if "curve" in frame else ""  # stores from before curves
    for column in NUMERIC:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _is_store(path: Path) -> bool:
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    return {"run_id", "night", "method", "best_val_accuracy"} <= set(header) and set(header) <= set(COLUMNS)


def method_means(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method: accuracy (in %) mean and std over seeds, mean times; rows with an error excluded."""
    ok = rows[(rows["error"] == "") & rows["best_val_accuracy"].notna()]
    grouped = ok.groupby("method")
    frame = pd.DataFrame({
        "acc_mean": grouped["best_val_accuracy"].mean() * 100,
        "acc_std": grouped["best_val_accuracy"].std(ddof=0) * 100,
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
    """method -> why it regressed against the previous night (accuracy in points, wall time as a fraction)."""
    if previous is None:
        return {}
    found = {}
    for method, now in latest.iterrows():
        if method not in previous.index or pd.isna(previous.loc[method, "acc_mean"]):
            continue
        before = previous.loc[method]
        reasons = []
        if pd.isna(now["acc_mean"]):
            reasons.append("no successful run")
        elif before["acc_mean"] - now["acc_mean"] > threshold:
            reasons.append(f"accuracy {now['acc_mean'] - before['acc_mean']:+.2f} pts")
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
    history = rows[(rows["error"] == "")].groupby(["night", "method"])["best_val_accuracy"].mean().mul(100)
    history = history.unstack("method").sort_index()
    section = Section(suite, dataset, latest_night, board, history,
                      [f"{suite} / {dataset} / {m}: {why}" for m, why in flags.items()])
    plt = _pyplot()
    section.plots["accuracy vs wall time"] = anytime_plot(plt, rows[rows["night"] == latest_night], dataset_label(dataset))
    section.plots["history"] = history_plot(plt, history, dataset_label(dataset))
    return section


def _previous_means(rows: pd.DataFrame, earlier: list[str], methods: list[str]) -> pd.DataFrame:
    """For each method, its means on the most recent earlier night it ran."""
    parts = []
    for method in methods:
        mine = rows[(rows["method"] == method) & rows["night"].isin(earlier)]
        if len(mine):
            parts.append(method_means(mine[mine["night"] == mine["night"].max()]))
    return pd.concat(parts) if parts else pd.DataFrame(columns=["acc_mean", "wall_s"])


def leaderboard_table(means: pd.DataFrame, flags: dict[str, str]) -> pd.DataFrame:
    ordered = means.sort_values("acc_mean", ascending=False, na_position="last")
    return pd.DataFrame({
        "rank": range(1, len(ordered) + 1),
        "method": ordered.index,
        "val acc % (mean ± std)": [_pm(m, s) for m, s in zip(ordered["acc_mean"], ordered["acc_std"])],
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
    """Best accuracy so far against elapsed time, one step line per (method, seed), ending at the
    run's wall time; rows recorded before curves were stored show as their final point."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, group) in enumerate(rows[rows["error"] == ""].groupby("method")):
        colour = colours[i % len(colours)]
        for j, (_, row) in enumerate(group.iterrows()):
            label = method if j == 0 else None
            points = run_curve(row)
            if len(points) > 1:
                ax.plot(*zip(*points), drawstyle="steps-post", color=colour, alpha=0.8, label=label)
                ax.scatter(*points[-1], color=colour, s=16)
            else:
                ax.scatter(row["wall_s"], row["best_val_accuracy"] * 100, color=colour, s=36, alpha=0.8, label=label)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("best val accuracy (%)")
    ax.set_title(f"{dataset}: accuracy vs wall time", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(plt, fig)


def run_curve(row: pd.Series) -> list[tuple[float, float]]:
    """(seconds, accuracy %) steps of one row, closed at its wall time; empty without a stored curve."""
    if not row.get("curve"):
        return []
    points = [(float(t), float(a) * 100) for t, a in json.loads(row["curve"])]
    if points and row["wall_s"] > points[-1][0]:
        points.append((float(row["wall_s"]), points[-1][1]))
    return points


def history_plot(plt, history: pd.DataFrame, dataset: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in history.columns:
        ax.plot(history.index, history[method], marker="o", label=method)
    ax.set_xlabel("night")
    ax.set_ylabel("mean best val accuracy (%)")
    ax.set_title(f"{dataset}: history", fontsize=10)
    ax.grid(alpha=0.3)
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


def _plot_file(out: Path, section: Section, caption: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{out.stem}-{section.suite}-{section.name}-{caption}").strip("-")
    return out.with_name(f"{name}.png")


def _criteria(request: ReportRequest) -> str:
    return (f"REGRESSION: mean accuracy down more than {request.threshold:g} points, or mean wall time up more than "
            f"{request.slowdown:.0%}, against the method's previous night")


def render_markdown(built: list[Section], flags: list[str], request: ReportRequest, out: Path) -> str:
    lines = ["# Benchmark report", "", _criteria(request) + ".", ""]
    lines += ["**Regressions:**", *[f"- REGRESSION {f}" for f in flags], ""] if flags else ["No regressions.", ""]
    for section in built:
        lines += [f"## {section.suite} / {section.name}", "",
                  f"Dataset `{section.dataset}`, latest night: {section.night}", "",
                  section.leaderboard.to_markdown(index=False), ""]
        for caption, png in section.plots.items():
            path = _plot_file(out, section, caption)
            path.write_bytes(png)
            lines += [f"![{caption}]({path.name})", ""]
        lines += ["### History: mean best val accuracy (%) per night", "",
                  section.history.round(2).to_markdown(), ""]
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
                  section.leaderboard.to_html(index=False, classes="leaderboard", border=0)]
        for caption, png in section.plots.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">")
        parts += ["<h3>History: mean best val accuracy (%) per night</h3>",
                  section.history.round(2).to_html(classes="history", border=0, na_rep="")]
    parts.append("</body></html>")
    page = "\n".join(parts)
    return page.replace("<td>REGRESSION", "<td class=\"regression\">REGRESSION")
