"""report.html (report.py): what a finished search writes beside its leaderboard, and its rebuild."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

from autotransfer.cli import main
from autotransfer.report import (CONFUSION_FILE, REPORT_FILE, Confusion, confusion_matrix, load_confusions,
                                 per_depth, store_confusions, write_report)
from conftest import main_error, run_cli

CLASSES = ("zero", "one", "two")
SEARCH = ["--backbones", "test_resnet", "--no-pretrained", "--image-size", "16", "--epochs", "1", "--device", "cpu",
          "--pruner", "none"]
PLOTLYJS_START = "<script type='text/javascript'>/**"


def digit_folder(root: Path, per_class: int = 40, test_per_class: int = 12) -> Path:
    """scikit-learn's digits 0-2 as an image folder (train/ and test/, named classes): a dataset the
    test can delete, to show the report is rebuilt without it."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label, name in enumerate(CLASSES):
        images = digits.images[digits.target == label][: per_class + test_per_class]
        for i, image in enumerate(images):
            split = "train" if i < per_class else "test"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (image * (255 / 16)).astype(np.uint8)
            Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(folder / f"{i}.png")
    return root


def confusion_tables(page: str) -> dict[str, list[list[int]]]:
    """The confusion matrices as the page shows them: split -> rows of counts."""
    found = {}
    for split, table in re.findall(r"<table class='confusion' data-split='(\w+)'>(.*?)</table>", page, flags=re.S):
        rows = re.findall(r"<tr><th class='name'>[^<]*</th>((?:<td[^>]*>\d+</td>)+)</tr>", table)
        found[split] = [[int(n) for n in re.findall(r">(\d+)</td>", row)] for row in rows]
    return found


def absent_sentence(page: str, key: str) -> str | None:
    match = re.search(rf"<p class='absent' id='absent-{key}'>(.*?)</p>", page)
    return match.group(1) if match else None


@pytest.mark.slow
def test_a_search_writes_a_report_that_the_report_command_rebuilds_without_the_dataset(tmp_path, capsys):
    data, out = digit_folder(tmp_path / "digits"), tmp_path / "run"
    assert main(["search", "--dataset", str(data), *SEARCH, "--trials", "4", "--frozen-stages", "0-2",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"report: {out / REPORT_FILE}" in err  # in the closing line, beside leaderboard and best model
    page = (out / REPORT_FILE).read_text()

    # Self-contained and offline: plotly.js once, inline; no script fetched from anywhere.
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:500]) == 1 and page.count(PLOTLYJS_START) == 1
    assert re.search(r"<script[^>]*\bsrc=", page) is None
    for key in ("history", "importances", "parallel"):
        assert f'id="plot-{key}"' in page, absent_sentence(page, key)

    frame = pd.read_csv(out / "leaderboard.csv")
    complete = frame[frame["state"] == "COMPLETE"]
    chosen = json.loads((out / "best" / "model.json").read_text())
    assert f"trial {chosen['trial']}, val accuracy {chosen['val_accuracy']:.4f}" in page
    assert f"{chosen['test_accuracy']:.4f} on {chosen['test_images']} test images" in page
    assert "per-backbone" in page and "per-depth" in page
    depth = page[page.index('class="dataframe per-depth"'):]
    depth = depth[: depth.index("</table>")]
    shown = [int(n) for n in re.findall(r"<tr>\s*<td>test_resnet</td>\s*<td>(\d+)</td>", depth)]
    assert shown == sorted(complete["frozen_stages"].unique().tolist())
    best_per_depth = complete.groupby("frozen_stages")["val_accuracy"].max()
    for value in best_per_depth:
        assert f"<td>{value:.4f}</td>" in depth

    # The chosen model's confusion matrices: val sums to the val set the choice was made on, test to the test set.
    stored = json.loads((out / CONFUSION_FILE).read_text())
    assert list(stored) == [str(chosen["trial"])]
    matrices = confusion_tables(page)
    assert set(matrices) == {"val", "test"}
    assert sum(map(sum, matrices["val"])) == chosen["val_images"] == sum(map(sum, stored[str(chosen["trial"])]["val"]["matrix"]))
    assert sum(map(sum, matrices["test"])) == chosen["test_images"] == 3 * 12
    assert np.trace(np.array(matrices["val"])) / chosen["val_images"] == pytest.approx(chosen["val_accuracy"])
    assert np.trace(np.array(matrices["test"])) / chosen["test_images"] == pytest.approx(chosen["test_accuracy"])
    for name in CLASSES:  # class names on both axes of both matrices
        assert page.count(f"<th>{name}</th>") == 2 and page.count(f"<th class='name'>{name}</th>") == 2

    # The rebuild reads the storage and confusion.json only: the dataset is gone, the page is the same.
    shutil.rmtree(data)
    (out / REPORT_FILE).unlink()
    result = run_cli("report", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out / REPORT_FILE}"
    assert (out / REPORT_FILE).read_text() == page
    assert main(["report", str(out), "--out", str(tmp_path / "copy")]) == 0  # read the run, write elsewhere
    assert (tmp_path / "copy" / REPORT_FILE).read_text() == page
    elsewhere = tmp_path / "elsewhere"  # --storage/--study with --out: the same page, minus what best/ and
    storage = json.loads((out / "run.json").read_text())["storage"]  # confusion.json of the run folder give
    assert main(["report", "--storage", storage, "--study", "digits", "--out", str(elsewhere)]) == 0
    other = (elsewhere / REPORT_FILE).read_text()
    assert 'id="plot-history"' in other and "No confusion matrix: none is stored for trial" in other


@pytest.mark.slow
def test_a_one_trial_search_gets_a_report_saying_why_two_plots_are_absent(tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["search", "--dataset", "builtin:digits:0-2", *SEARCH, "--trials", "1", "--quiet",
                 "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    page = (out / REPORT_FILE).read_text()
    assert 'id="plot-history"' in page  # one point is still a history
    assert "need at least two completed trials; this study has 1" in absent_sentence(page, "importances")
    assert "needs at least two completed trials to compare; this study has 1" in absent_sentence(page, "parallel")
    assert 'id="plot-importances"' not in page and 'id="plot-parallel"' not in page
    val = json.loads((out / "best" / "model.json").read_text())["val_images"]
    assert sum(map(sum, confusion_tables(page)["val"])) == val
    assert "1 complete, 0 pruned, 0 failed" in page


@pytest.mark.slow
def test_with_workers_the_parent_decodes_val_again_and_counts_the_same_split(tmp_path, capsys):
    """`search --workers` releases the parent's data: the val it decodes again for the confusion matrix
    must be the split the trials were chosen on (its diagonal is the chosen val accuracy)."""
    out = tmp_path / "w"
    assert main(["search", "--dataset", "builtin:digits:0-2", *SEARCH, "--trials", "2", "--workers", "2", "--quiet",
                 "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    card = json.loads((out / "best" / "model.json").read_text())
    val = load_confusions(out, card["trial"])[0]
    assert val.split == "val" and val.total == card["val_images"]
    assert val.accuracy == pytest.approx(card["val_accuracy"])


def tiny_study(storage: str, values: list[float]) -> optuna.Study:
    """A real study (no search): trials with a backbone and a frozen depth, as a search records them."""
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    for i, value in enumerate(values):
        study.add_trial(optuna.trial.create_trial(
            params={"backbone": "a" if i % 2 else "b", "frozen_stages": i % 3},
            distributions={"backbone": optuna.distributions.CategoricalDistribution(["a", "b"]),
                           "frozen_stages": optuna.distributions.IntDistribution(0, 2)},
            value=value))
    return study


def test_a_study_without_completed_trials_still_gets_a_page_that_says_why(tmp_path):
    study = optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path / 'e.db'}", direction="maximize")
    page = write_report(study, tmp_path / "out").read_text()
    assert absent_sentence(page, "history") == "No trial has completed yet, so there is no history to plot."
    assert "this study has 0" in absent_sentence(page, "importances")
    assert PLOTLYJS_START not in page  # no figure, so no 4 MB of plotly.js
    assert "No confusion matrix: no trial was chosen." in page and "none (no trial completed)" in page


def test_a_study_whose_parameters_never_differ_says_importances_are_absent(tmp_path):
    study = optuna.create_study(study_name="same", storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    study.optimize(lambda trial: trial.suggest_categorical("head", ["linear"]) and 0.5, n_trials=3)
    page = write_report(study, tmp_path / "out").read_text()
    assert "every parameter the completed trials share took one value" in absent_sentence(page, "importances")
    assert 'id="plot-parallel"' in page and page.count(PLOTLYJS_START) == 1


@pytest.mark.slow
def test_without_plotly_the_report_keeps_tables_and_confusions_and_says_how_to_get_plots(tmp_path):
    storage = f"sqlite:///{tmp_path / 't.db'}"
    tiny_study(storage, [0.5, 0.7, 0.6, 0.9])
    store_confusions(tmp_path, [Confusion("val", 3, ["cat", "dog"], [[4, 1], [0, 5]])])
    script = ("import sys; sys.modules['plotly'] = None\n"  # plotly unimportable, as when it is not installed
              "import optuna\nfrom autotransfer.report import write_report\n"
              f"write_report(optuna.load_study(study_name='tiny', storage={storage!r}), {str(tmp_path)!r})\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / REPORT_FILE).read_text()
    assert "The plots need plotly: pip install &#x27;autotransfer[report]&#x27;" in page
    assert PLOTLYJS_START not in page and "plot-history" not in page
    assert "per-backbone" in page and "per-depth" in page
    assert confusion_tables(page) == {"val": [[4, 1], [0, 5]]}
    assert "trial 3, val accuracy 0.9000" in page  # no best/: the leaderboard's first


def test_confusion_counts_and_their_store_keyed_by_trial(tmp_path):
    matrix = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert matrix == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    store_confusions(tmp_path, [Confusion("test", 2, ["a", "b", "c"], matrix), Confusion("val", 2, ["a", "b", "c"], matrix)])
    store_confusions(tmp_path, [Confusion("val", 5, ["a", "b", "c"], [[2, 0, 0], [0, 2, 0], [0, 0, 2]])])
    assert [c.split for c in load_confusions(tmp_path, 2)] == ["val", "test"]  # val first, whatever the order stored
    assert load_confusions(tmp_path, 2)[0].accuracy == pytest.approx(4 / 6)
    assert load_confusions(tmp_path, 5)[0].total == 6 and load_confusions(tmp_path, 7) == []


def test_per_depth_is_the_best_complete_trial_of_each_backbone_and_depth():
    frame = pd.DataFrame({
        "trial": [0, 1, 2, 3, 4], "state": ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "FAIL"],
        "val_accuracy": [0.5, 0.8, 0.9, 0.7, None], "backbone": ["r", "r", "r", "e", "e"],
        "frozen_stages": [2, 2, 0, 0, 0], "num_stages": [4, 4, 4, 6, 6]})
    table = per_depth(frame)
    rows = {(r.backbone, r.frozen_stages): r for r in table.itertuples()}
    assert rows[("r", 2)].best_val_accuracy == 0.8 and rows[("r", 2)].best_trial == 1
    assert pd.isna(rows[("r", 0)].best_val_accuracy) and rows[("r", 0)].pruned == 1  # a pruned peak counts not
    assert rows[("e", 0)].best_trial == 3 and rows[("e", 0)].failed == 1 and rows[("e", 0)].num_stages == 6


@pytest.mark.slow
def test_a_report_that_cannot_be_written_is_one_warning_and_the_search_still_succeeds(tmp_path, capsys):
    out = tmp_path / "w"
    (out / REPORT_FILE).mkdir(parents=True)  # a folder where the page goes: writing it really fails
    assert main(["search", "--dataset", "builtin:digits:0-2", *SEARCH, "--trials", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("autotransfer: warning: report not written: "), err
    assert "Traceback" not in err and "report:" not in err.splitlines()[-1]
    assert (out / "leaderboard.csv").is_file() and (out / "best" / "model.json").is_file()


def test_report_command_bad_input_is_one_line(capsys, tmp_path):
    assert "is not a search folder (no run.json)" in main_error(capsys, "report", str(tmp_path))
    assert "give a run folder, or --storage URL and --study NAME" in main_error(capsys, "report")
    line = main_error(capsys, "report", "--storage", f"sqlite:///{tmp_path / 'none.db'}", "--study", "x")
    assert "no study database at" in line and not (tmp_path / "none.db").exists()
