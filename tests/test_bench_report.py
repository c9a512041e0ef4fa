"""`autotransfer bench report` on hand-written store rows: ranked, plotted and flagged on test accuracy
(val, the number each method selected on, beside it), and stores from before the test split still load."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from autotransfer.bench.report import anytime_lines, load_results, run_curve
from autotransfer.bench.store import COLUMNS, Store
from autotransfer.cli import main
from autotransfer.errors import UserError

NIGHT1, NIGHT2, NIGHT3 = "2026-01-01", "2026-01-02", "2026-01-03"
# The header of stores written before the test split (the columns then, in their order).
BEFORE_TEST = ["night", "run_id", "git_commit", "torch", "timm", "optuna", "cpu", "gpu", "suite", "dataset", "method",
               "seed", "budget_trials", "budget_timeout_s", "epochs", "best_val_accuracy", "time_to_best_s", "wall_s",
               "trials_complete", "trials_pruned", "trials_failed", "best_config", "error", "curve"]


def cell(night: str, method: str, val: float, test: float | None, wall: float = 10.0,
         curve: list | None = None) -> dict:
    return {"night": night, "run_id": f"{night}_fixed", "suite": "fixed", "dataset": "builtin:digits",
            "method": method, "seed": 0, "best_val_accuracy": val, "test_accuracy": test,
            "test_images": None if test is None else 200, "time_to_best_s": wall / 2, "wall_s": wall, "error": "",
            "curve": "" if curve is None else json.dumps(curve)}


def write(results: Path, cells: list[dict]) -> None:
    store = Store.for_suite(results, "fixed")
    for row in cells:
        for seed in (0, 1):
            store.append({**row, "seed": seed})


def report(results: Path, *extra: str) -> tuple[str, str, list[str]]:
    """(html, markdown, printed REGRESSION lines) of `bench report` on the fixed suite."""
    out = results / "r.html"
    assert main(["bench", "report", "--results", str(results), "--suite", "fixed", "--out", str(out), *extra]) == 0
    markdown = out.with_suffix(".md").read_text()
    # The Markdown's plots are files in r-plots/ beside it, each one it links, and nothing else was written.
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert links and all(link.startswith("r-plots/") and (results / link).is_file() for link in links)
    assert sorted(p.name for p in (results / "r-plots").iterdir()) == sorted(Path(link).name for link in set(links))
    return out.read_text(), markdown, [line for line in markdown.splitlines() if line.startswith("- REGRESSION")]


def leaderboard(markdown: str) -> list[list[str]]:
    """The leaderboard of the first section, header first, as stripped cells."""
    section = markdown.split("latest night:", 1)[1].split("![", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def table(markdown: str, heading: str) -> dict[str, dict[str, str]]:
    """The Markdown table under `### heading`: first cell -> {column: cell}."""
    block = markdown.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines() if line.startswith("|")]
    header, body = lines[0], lines[2:]
    return {cells[0]: dict(zip(header[1:], cells[1:])) for cells in body}


def test_leaderboard_ranks_by_test_accuracy_with_val_beside_it(tmp_path):
    write(tmp_path, [cell(NIGHT1, "overfit", 0.95, 0.70), cell(NIGHT1, "honest", 0.85, 0.80),
                     cell(NIGHT1, "untested", 0.99, None)])
    page, markdown, _ = report(tmp_path)
    board = leaderboard(markdown)
    assert board[0][:4] == ["rank", "method", "test acc % (mean ± std)", "val acc % (mean ± std)"]
    assert [row[:4] for row in board[1:]] == [["1", "honest", "80.00 ± 0.00", "85.00 ± 0.00"],
                                              ["2", "overfit", "70.00 ± 0.00", "95.00 ± 0.00"],
                                              ["3", "untested", "n/a", "99.00 ± 0.00"]]
    for text in (page, markdown):
        assert "Ranked by mean test accuracy" in text and "selected on, so it is optimistic" in text


def test_methods_without_test_numbers_rank_last_by_val(tmp_path):
    write(tmp_path, [cell(NIGHT1, "a", 0.70, None), cell(NIGHT1, "b", 0.90, None), cell(NIGHT1, "c", 0.10, 0.10)])
    assert [row[1] for row in leaderboard(report(tmp_path)[1])[1:]] == ["c", "b", "a"]


def row(curve: list | None, wall: float = 10.0, val: float = 0.7, test: float | None = 0.65) -> pd.Series:
    return pd.Series({"curve": "" if curve is None else json.dumps(curve), "wall_s": wall, "best_val_accuracy": val,
                      "test_accuracy": math.nan if test is None else test, "error": ""})


def rounded(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(round(t, 6), round(a, 6)) for t, a in points]


def test_run_curve_is_the_test_accuracy_of_the_best_by_val_model_closed_at_wall_time():
    new = row([[1.0, 0.5, 0.4], [3.0, 0.7, 0.65]])
    assert rounded(run_curve(new)) == [(1.0, 40.0), (3.0, 65.0), (10.0, 65.0)]
    assert rounded(run_curve(new, "val")) == [(1.0, 50.0), (3.0, 70.0), (10.0, 70.0)]
    assert rounded(run_curve(row([[1.0, 0.5, 0.4], [10.0, 0.7, 0.65]]))) == [(1.0, 40.0), (10.0, 65.0)]

    old = row([[1.0, 0.5], [3.0, 0.7]], test=None)  # before the test split: val only, and only when asked
    assert run_curve(old) == []
    assert rounded(run_curve(old, "val")) == [(1.0, 50.0), (3.0, 70.0), (10.0, 70.0)]
    assert run_curve(row([[1.0, 0.5, None], [3.0, 0.7, None]], test=None)) == []  # a dataset without a test split

    assert rounded(run_curve(row(None))) == [(10.0, 65.0)]  # no curve stored: the final number
    assert run_curve(row(None, test=None)) == []
    assert rounded(run_curve(row(None, test=None), "val")) == [(10.0, 70.0)]


def test_anytime_plot_draws_test_values_and_falls_back_to_val_only_without_any(tmp_path):
    write(tmp_path, [cell(NIGHT1, "new", 0.7, 0.6, curve=[[2.0, 0.7, 0.6]]),
                     cell(NIGHT1, "old", 0.9, None, curve=[[2.0, 0.9]])])
    metric, lines = anytime_lines(load_results(tmp_path, "fixed"))
    assert metric == "test"
    assert [method for method, _ in lines] == ["new", "new"]  # "old" is not drawn as if its val were test
    assert rounded(lines[0][1]) == [(2.0, 60.0), (10.0, 60.0)]

    old_only = tmp_path / "old"
    write(old_only, [cell(NIGHT1, "old", 0.9, None, curve=[[2.0, 0.9]])])
    metric, lines = anytime_lines(load_results(old_only, "fixed"))
    assert metric == "val"
    assert [(m, rounded(points)) for m, points in lines] == [("old", [(2.0, 90.0), (10.0, 90.0)])] * 2  # two seeds


def test_regression_flags_a_test_drop_and_not_a_val_only_drop(tmp_path):
    write(tmp_path, [cell(NIGHT1, "test-drop", 0.80, 0.80), cell(NIGHT1, "val-drop", 0.90, 0.80),
                     cell(NIGHT2, "test-drop", 0.80, 0.77), cell(NIGHT2, "val-drop", 0.80, 0.80)])
    page, markdown, flags = report(tmp_path)
    assert flags == ["- REGRESSION fixed / builtin:digits / test-drop: accuracy -3.00 pts on test"]
    assert [row[-1] for row in leaderboard(markdown)[1:]] == ["", "REGRESSION: accuracy -3.00 pts on test"]
    for text in (page, markdown):
        assert "REGRESSION: mean test accuracy down more than 2 points" in text


def test_no_accuracy_flag_when_the_previous_night_has_no_test_numbers(tmp_path):
    write(tmp_path, [cell(NIGHT1, "steady", 0.95, None), cell(NIGHT1, "slower", 0.95, None, wall=10.0),
                     cell(NIGHT1, "untested", 0.95, None),
                     cell(NIGHT2, "steady", 0.60, 0.50), cell(NIGHT2, "slower", 0.60, 0.50, wall=20.0),
                     cell(NIGHT2, "untested", 0.60, None)])
    _, _, flags = report(tmp_path)
    assert flags == ["- REGRESSION fixed / builtin:digits / slower: wall time +100%"]


def test_losing_test_numbers_is_flagged_and_test_is_compared_with_the_last_night_that_had_them(tmp_path):
    write(tmp_path, [cell(NIGHT1, "m", 0.80, 0.90), cell(NIGHT2, "m", 0.80, None)])
    assert report(tmp_path)[2] == ["- REGRESSION fixed / builtin:digits / m: no test accuracy"]
    write(tmp_path, [cell(NIGHT3, "m", 0.80, 0.85)])
    assert report(tmp_path)[2] == ["- REGRESSION fixed / builtin:digits / m: accuracy -5.00 pts on test"]


def test_history_has_test_and_val_tables_with_nights_without_test_left_empty(tmp_path):
    write(tmp_path, [cell(NIGHT1, "m", 0.90, None), cell(NIGHT2, "m", 0.85, 0.80)])
    page, markdown, _ = report(tmp_path)
    assert table(markdown, "History: mean test accuracy (%) per night") == {NIGHT1: {"m": ""}, NIGHT2: {"m": "80.00"}}
    assert table(markdown, "History: mean val accuracy (%) per night (selected on, optimistic)") == {
        NIGHT1: {"m": "90.00"}, NIGHT2: {"m": "85.00"}}
    assert "nan" not in page.lower() and "nan" not in markdown.lower()


def write_old_store(path: Path, header: list[str], values: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerow({k: values.get(k, "") for k in header})


OLD_ROW = {"night": NIGHT1, "run_id": "r1", "suite": "fixed", "dataset": "builtin:digits", "method": "m", "seed": "0",
           "best_val_accuracy": "0.9", "time_to_best_s": "1.5", "wall_s": "3.0", "error": "",
           "curve": "[[1.5, 0.9]]"}


@pytest.mark.parametrize("header", [BEFORE_TEST, list(reversed(BEFORE_TEST))], ids=["before-test", "reordered"])
def test_an_older_store_gains_the_test_columns_once_and_keeps_its_rows(tmp_path, header):
    path = tmp_path / "fixed.csv"
    write_old_store(path, header, OLD_ROW)
    store = Store(path)
    store.append(cell(NIGHT2, "m", 0.8, 0.75))
    with open(path, newline="") as handle:
        assert next(csv.reader(handle)) == COLUMNS
    first, second = store.rows()
    assert first == {k: OLD_ROW.get(k, "") for k in COLUMNS}
    assert second["test_accuracy"] == "0.75" and second["test_images"] == "200" and len(store.rows()) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["fixed.csv"]  # no staging file left behind


def test_a_store_with_unknown_columns_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "fixed.csv"
    write_old_store(path, BEFORE_TEST + ["colour"], OLD_ROW)
    before = path.read_text()
    with pytest.raises(UserError, match="colour"):
        Store(path).append(cell(NIGHT2, "m", 0.8, 0.75))
    assert path.read_text() == before


def test_a_store_from_before_the_test_split_still_reports_on_val(tmp_path):
    write_old_store(tmp_path / "fixed.csv", BEFORE_TEST, OLD_ROW)
    frame = load_results(tmp_path, "fixed")
    assert frame["test_accuracy"].isna().all() and frame["test_images"].isna().all()
    page, markdown, flags = report(tmp_path)
    assert leaderboard(markdown)[1][:4] == ["1", "m", "n/a", "90.00 ± 0.00"] and flags == []
    assert page.count("data:image/png;base64,") == 2
    assert (tmp_path / "fixed.csv").read_text().splitlines()[0] == ",".join(BEFORE_TEST)  # reading rewrites nothing


def test_the_report_goes_into_the_results_folder_and_says_what_it_wrote(tmp_path, capsys, monkeypatch):
    write(tmp_path, [cell(NIGHT1, "m", 0.9, 0.9, curve=[[1.0, 0.9, 0.9]])])
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing lands in the current folder
    before = set(Path.cwd().iterdir())
    assert main(["bench", "report", "--results", str(tmp_path), "--suite", "fixed"]) == 0
    printed = capsys.readouterr().out
    assert set(Path.cwd().iterdir()) == before
    for path in (tmp_path / "report.html", tmp_path / "report.md", tmp_path / "report-plots"):
        assert path.exists() and str(path) in printed
