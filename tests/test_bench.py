"""`autotransfer bench`: suites, the append-only store, resuming, the report and its regression flags."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

from autotransfer.bench.store import COLUMNS, Store
from autotransfer.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "suites" / "smoke.toml"
METHODS = ["autotransfer", "autotransfer-prerank", "random", "linear-probe", "seed-recipe"]
NIGHT1, NIGHT2 = "2026-01-01", "2026-01-02"


def rows(results: Path, suite: str = "smoke") -> list[dict[str, str]]:
    return Store.for_suite(results, suite).rows()


def bench(*args: str) -> int:
    return main(["bench", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory) -> Path:
    """One real smoke run (every method, two seeds), shared by the tests that read or extend it."""
    base = tmp_path_factory.mktemp("smoke")
    assert bench("run", SMOKE, "--results", base / "results", "--work", base / "work", "--night", NIGHT1,
                 "--quiet") == 0
    return base / "results"


def copy_store(source: Path, target: Path, keep=lambda row: True) -> Path:
    target.mkdir(parents=True)
    kept = [row for row in rows(source) if keep(row)]
    with open(target / "smoke.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
    return target


def leaderboard_lines(markdown: str) -> list[str]:
    """The leaderboard table rows (not header) of the first dataset section."""
    section = markdown.split("latest night:", 1)[1].split("![", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")][2:]


@pytest.mark.slow
def test_smoke_run_writes_one_row_per_cell_and_a_report(smoke_store, tmp_path):
    stored = rows(smoke_store)
    keys = [(r["dataset"], r["method"], r["seed"]) for r in stored]
    assert sorted(keys) == sorted(("builtin:digits", m, s) for m in METHODS for s in ("0", "1"))
    assert all(r["error"] == "" for r in stored), [r["error"] for r in stored]
    for row in stored:
        assert 0.0 < float(row["best_val_accuracy"]) <= 1.0
        assert 0.0 <= float(row["time_to_best_s"]) <= float(row["wall_s"]) + 1e-6
        assert row["night"] == NIGHT1 and row["run_id"] == f"{NIGHT1}_smoke" and row["budget_trials"] == "2"
        assert row["best_config"].startswith("{") and "backbone" in row["best_config"]
    assert {r["trials_complete"] for r in stored if r["method"] == "seed-recipe"} == {"1"}
    recipes = [json.loads(r["best_config"]) for r in stored if r["method"] == "seed-recipe"]
    assert all(c["frozen_stages"] == 0 and c["head_init"] == "random" for c in recipes), recipes  # not an LP-FT
    for row in stored:  # the anytime curve rises, ends at the best accuracy and stays within the run
        curve = json.loads(row["curve"])
        assert curve, row["method"]
        assert [a for _, a, _ in curve] == sorted(set(a for _, a, _ in curve))
        assert curve[-1][1] == pytest.approx(float(row["best_val_accuracy"]), abs=1e-6)
        assert all(0.0 <= t <= float(row["wall_s"]) + 1e-3 for t, _, _ in curve)
        # builtin:digits has a fixed test split: the chosen model's test score ends the curve
        assert int(row["test_images"]) == 360 and 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert curve[-1][2] == pytest.approx(float(row["test_accuracy"]), abs=1e-6)

    out = tmp_path / "report" / "report.html"
    assert bench("report", "--results", smoke_store, "--out", out) == 0
    page, markdown = out.read_text(), out.with_suffix(".md").read_text()
    assert "<h2>smoke / builtin:digits</h2>" in page and page.count('class="dataframe leaderboard"') == 1
    assert "## smoke / builtin:digits" in markdown
    board = leaderboard_lines(markdown)
    assert len(board) == len(METHODS) and all(sum(f" {m} " in line for line in board) == 1 for m in METHODS)
    assert page.count("data:image/png;base64,") == 2  # accuracy vs wall time, history
    for name in [line.split("(", 1)[1].rstrip(")") for line in markdown.splitlines() if line.startswith("![")]:
        assert (out.parent / name).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_rerun_with_same_run_id_adds_nothing_and_interrupted_run_fills_the_rest(smoke_store, tmp_path):
    results = copy_store(smoke_store, tmp_path / "full")
    assert bench("run", SMOKE, "--results", results, "--work", tmp_path / "w", "--night", NIGHT1, "--quiet") == 0
    assert len(rows(results)) == 2 * len(METHODS)

    missing = {("random", "1"), ("seed-recipe", "1")}  # as if the run had been killed before these cells
    partial = copy_store(smoke_store, tmp_path / "partial", keep=lambda r: (r["method"], r["seed"]) not in missing)
    assert len(rows(partial)) == 2 * len(METHODS) - 2
    assert bench("run", SMOKE, "--results", partial, "--work", tmp_path / "w", "--night", NIGHT1, "--quiet") == 0
    filled = rows(partial)
    assert len(filled) == 2 * len(METHODS)
    assert {(r["method"], r["seed"]) for r in filled[-2:]} == missing


REGRESSED = """
name = "smoke"
datasets = ["builtin:digits"]
backbones = [{ test_resnet = "random" }, { test_efficientnet = "random" }]
methods = ["linear-probe", "seed-recipe"]
seeds = [0, 1]
budget = { trials = 2, epochs = 1 }
image_size = 32

[methods_options.seed-recipe]
lr = 1e-6  # handicapped on purpose: one epoch at this rate barely moves off chance
"""


@pytest.mark.slow
def test_second_night_flags_exactly_the_handicapped_method(smoke_store, tmp_path):
    results = copy_store(smoke_store, tmp_path / "results")
    suite = tmp_path / "regressed.toml"
    suite.write_text(REGRESSED)
    assert bench("run", suite, "--results", results, "--work", tmp_path / "w", "--night", NIGHT2, "--quiet") == 0
    assert len([r for r in rows(results) if r["night"] == NIGHT2]) == 4

    out = tmp_path / "report.html"
    # Wall time on a shared CPU is too noisy for a test; the slowdown flag is tested on fixed numbers below.
    assert bench("report", "--results", results, "--out", out, "--slowdown", "100") == 0
    page, markdown = out.read_text(), out.with_suffix(".md").read_text()
    flagged = [line for line in leaderboard_lines(markdown) if "REGRESSION" in line]
    assert len(flagged) == 1 and " seed-recipe " in flagged[0] and "accuracy" in flagged[0]
    assert 'class="regression">REGRESSION: accuracy' in page
    history = markdown.split("### History", 1)[1]
    assert NIGHT1 in history and NIGHT2 in history


def write_rows(results: Path, table: list[tuple[str, str, float, float]]) -> None:
    store = Store.for_suite(results, "fixed")
    for night, method, accuracy, wall in table:
        for seed in (0, 1):
            store.append({"night": night, "run_id": f"{night}_fixed", "suite": "fixed", "dataset": "builtin:digits",
                          "method": method, "seed": seed, "best_val_accuracy": accuracy, "test_accuracy": accuracy,
                          "test_images": 100, "time_to_best_s": wall / 2,
                          "wall_s": wall, "error": ""})


def test_slowdown_and_accuracy_thresholds_on_fixed_numbers(tmp_path):
    write_rows(tmp_path, [(NIGHT1, "fast", 0.90, 10.0), (NIGHT1, "steady", 0.80, 10.0), (NIGHT1, "worse", 0.80, 10.0),
                          (NIGHT2, "fast", 0.90, 14.0), (NIGHT2, "steady", 0.79, 12.0), (NIGHT2, "worse", 0.77, 10.0)])
    out = tmp_path / "r.html"
    assert bench("report", "--results", tmp_path, "--suite", "fixed", "--out", out) == 0
    flagged = [line for line in leaderboard_lines(out.with_suffix(".md").read_text()) if "REGRESSION" in line]
    assert len(flagged) == 2
    assert any(" fast " in line and "wall time +40%" in line for line in flagged)
    assert any(" worse " in line and "accuracy -3.00 pts on test" in line for line in flagged)


def write_suite(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return path


GOOD = ('name = "t"\ndatasets = ["builtin:digits"]\nbackbones = ["test_resnet"]\nmethods = ["seed-recipe"]\n'
        'seeds = [0]\n')


@pytest.mark.parametrize("text, named", [
    (GOOD.replace("seed-recipe", "grid-search") + "budget = { trials = 1, epochs = 1 }\n", "grid-search"),
    (GOOD, "'budget'"),
    (GOOD + "budget = { trials = 1 }\n", "budget.epochs"),
    (GOOD + "budget = { trials = 1, epochs = 1, hours = 2 }\n", "budget.hours"),
    (GOOD + "budget = { trials = 1, epochs = 1 }\ncolour = \"red\"\n", "colour"),
    (GOOD + "budget = { trials = 1, epochs = 1 }\n[methods_options.seed-recipe]\nmomentum = 0.9\n",
     "methods_options.seed-recipe.momentum"),
    (GOOD.replace("seeds = [0]", "seeds = \"0\"") + "budget = { trials = 1, epochs = 1 }\n", "'seeds'"),
])
def test_bad_suite_files_fail_with_one_line(tmp_path, capsys, text, named):
    assert bench("run", write_suite(tmp_path, text), "--results", tmp_path / "r") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and named in error and "suite.toml" in error
    assert not (tmp_path / "r").exists()


def test_missing_dataset_is_skipped_and_a_crashing_method_is_recorded(tmp_path, capsys):
    text = (GOOD.replace('["builtin:digits"]', '["../no-such-folder", "builtin:digits:0-1"]')
            .replace('["test_resnet"]', '["no_such_backbone_xyz"]') + "budget = { trials = 1, epochs = 1 }\n")
    assert bench("run", write_suite(tmp_path, text), "--results", tmp_path / "r", "--work", tmp_path / "w") == 0
    assert "skipping dataset ../no-such-folder" in capsys.readouterr().err
    stored = rows(tmp_path / "r", "t")
    assert len(stored) == 1 and stored[0]["dataset"] == "builtin:digits:0-1"
    assert "no_such_backbone_xyz" in stored[0]["error"] and stored[0]["best_val_accuracy"] == ""


def test_report_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench("report", "--results", tmp_path) == 2
    assert "pip install autotransfer[bench]" in capsys.readouterr().err


def test_report_ignores_other_csvs_and_says_when_there_is_no_store(tmp_path, capsys):
    shutil.copy(ROOT / "benchmarks" / "results" / "decode_cache.csv", tmp_path / "decode_cache.csv")
    assert bench("report", "--results", tmp_path, "--out", tmp_path / "r.html") == 2
    assert "no benchmark store" in capsys.readouterr().err


def test_best_so_far_keeps_only_gains_in_time_order():
    from autotransfer.bench.methods import best_so_far

    assert best_so_far([(5.0, 0.7), (1.0, 0.5), (3.0, 0.4), (9.0, 0.7), (7.0, 0.9)]) == [(1.0, 0.5), (5.0, 0.7), (7.0, 0.9)]
    assert best_so_far([]) == []


def test_store_from_before_curves_gains_the_column_and_keeps_its_rows(tmp_path):
    old_columns = COLUMNS[:-1]
    path = tmp_path / "s.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({k: "1" for k in old_columns})
    store = Store(path)
    store.append({"night": "2", "run_id": "r2"})
    stored = store.rows()
    assert list(stored[0]) == COLUMNS and stored[0]["night"] == "1" and stored[0]["curve"] == ""
    assert stored[1]["run_id"] == "r2" and len(stored) == 2
