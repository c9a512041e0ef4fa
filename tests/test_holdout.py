"""The test split: read from every layout, kept away from every choice, scored once at the end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

from autotransfer.cli import main
from autotransfer.data import BuiltinSource, CsvSource, FolderSource, prepare
from autotransfer.errors import UserError
from autotransfer.holdout import TEST_ATTR

CLASSES = ("zero", "one", "two")
TINY = ["--backbones", "test_resnet", "--no-pretrained", "--image-size", "32", "--device", "cpu", "--quiet"]


# --------------------------------------------------------------------------- helpers

def _digits(per_class: int, offset: int = 0) -> list[tuple[np.ndarray, int]]:
    """Real 8x8 digits 0-2 (learnable, so accuracies mean something), `per_class` of each from `offset`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    items = []
    for label in range(len(CLASSES)):
        rows = np.flatnonzero(digits.target == label)[offset:offset + per_class]
        items += [(np.round(digits.images[i] * 255 / 16).astype(np.uint8), label) for i in rows]
    return items


def _write_split(root: Path, items: list[tuple[np.ndarray, int]], tag: str) -> list[Path]:
    paths = []
    for i, (image, label) in enumerate(items):
        path = root / CLASSES[label] / f"{tag}_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(path)
        paths.append(path)
    return paths


def _layout(root: Path, splits: tuple[str, ...]) -> Path:
    """`root/<split>/<class>/*.png` for each split, from disjoint digits."""
    sizes = {"train": (30, 0), "val": (10, 30), "test": (15, 40)}
    for split in splits:
        per_class, offset = sizes[split]
        _write_split(root / split, _digits(per_class, offset), split)
    return root


def _manifest(root: Path, permute_test: bool = False) -> Path:
    """A CSV manifest with train, val and test rows; `permute_test` shuffles the test rows' labels only."""
    rows = []
    for split, (per_class, offset) in {"train": (30, 0), "val": (10, 30), "test": (15, 40)}.items():
        for path, (_, label) in zip(_write_split(root / "images" / split, _digits(per_class, offset), split),
                                    _digits(per_class, offset)):
            rows.append([str(path.relative_to(root)), CLASSES[label], split])
    if permute_test:
        test = [i for i, row in enumerate(rows) if row[2] == "test"]
        labels = [rows[i][1] for i in test]
        for i, label in zip(test, np.random.default_rng(7).permutation(labels)):
            rows[i][1] = str(label)
        assert [rows[i][1] for i in test] != labels
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return manifest


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- layouts

def test_train_test_layout_carves_val_from_train_and_keeps_test(tmp_path):
    root = _layout(tmp_path / "ds", ("train", "test"))
    refs = FolderSource().load(str(root))
    assert refs.class_names == sorted(CLASSES)  # not ["test", "train"]
    assert sorted(set(refs.splits.tolist())) == ["test", "train"]
    data = prepare(refs, 8, val_fraction=0.2, seed=0)
    assert len(data.test) == 45
    assert len(data.train) + len(data.val) == 90 and len(data.val) == 18
    other = prepare(refs, 8, val_fraction=0.2, seed=1)
    assert other.test.images.equal(data.test.images)  # the seed moves val, never test
    assert not other.val.images.equal(data.val.images)


def test_train_val_test_layout_keeps_the_three_splits(tmp_path):
    root = _layout(tmp_path / "ds", ("train", "val", "test"))
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are ignored
    data = prepare(FolderSource().load(str(root)), 8, val_fraction=0.2, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 30, 45)


def test_csv_split_test(tmp_path):
    data = prepare(CsvSource().load(str(_manifest(tmp_path))), 8, val_fraction=0.2, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 30, 45)


def test_builtin_digits_test_carve_is_fixed(tmp_path):
    refs = BuiltinSource().load("builtin:digits:0-4")
    first, second = (prepare(refs, 8, val_fraction=0.3, seed=s) for s in (0, 5))
    assert first.test.images.equal(second.test.images)
    assert len(first.test) == int(np.ceil(0.2 * len(refs.refs)))  # sklearn rounds the test share up


def test_val_as_test_holds_val_out_and_carves_a_new_val(tmp_path):
    refs = FolderSource().load(str(_layout(tmp_path / "ds", ("train", "val")))).with_val_as_test()
    data = prepare(refs, 8, val_fraction=0.2, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (72, 18, 30)
    with pytest.raises(UserError, match="already has a test split"):
        FolderSource().load(str(_layout(tmp_path / "t", ("train", "val", "test")))).with_val_as_test()


@pytest.mark.parametrize("extra, message", [
    ("holdout", "has a folder 'holdout' beside train/"),
    ("models", "has a folder 'models' beside train/"),
])
def test_a_stray_folder_beside_train_is_a_one_line_error(tmp_path, capsys, extra, message):
    root = _layout(tmp_path / "ds", ("train", "test"))
    (root / extra / "zero").mkdir(parents=True)
    assert main(["search", "--dataset", str(root), *TINY, "--out", str(tmp_path / "run")]) == 2
    line = _stderr_line(capsys)
    assert message in line and "only train/, val/" in line
    assert not (tmp_path / "run").exists()  # nothing was stored before the check


def test_split_folders_without_train_are_an_error(tmp_path):
    root = _layout(tmp_path / "ds", ("val", "test"))
    with pytest.raises(UserError, match=r"has val/, test/ but no train/|has test/, val/ but no train/"):
        FolderSource().load(str(root))


# --------------------------------------------------------------------------- scored once, at the end

def _labels_by_path(frame: pd.DataFrame) -> np.ndarray:
    return np.array([Path(p).parent.name for p in frame["path"]])


@pytest.mark.parametrize("layout", ["train-test", "train-val-test", "csv"])
def test_search_scores_the_chosen_model_on_test_through_predict(tmp_path, capsys, layout):
    if layout == "csv":
        dataset = _manifest(tmp_path / "ds")
        test_folder = tmp_path / "ds" / "images" / "test"
    else:
        dataset = _layout(tmp_path / "ds", tuple(layout.split("-")))
        test_folder = dataset / "test"
    out = tmp_path / "run"
    assert main(["search", "--dataset", str(dataset), *TINY, "--trials", "2", "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    board = pd.read_csv(out / "leaderboard.csv")
    scored = board[board["test_accuracy"].notna()]
    assert len(scored) == 1 and scored["state"].tolist() == ["COMPLETE"]  # the chosen trial only (selection.py)
    card = json.loads((out / "best" / "model.json").read_text())
    assert card["trial"] == int(scored["trial"].iloc[0]) and card["test_images"] == 45
    assert card["test_accuracy"] == pytest.approx(float(scored["test_accuracy"].iloc[0]))
    assert "chosen: trial" in printed and "by val_accuracy" in printed
    assert f"test_accuracy {card['test_accuracy']:.4f} on 45 test images" in printed and "used for nothing" in printed

    # The same number `predict` gives on the test images.
    predictions = tmp_path / "preds.csv"
    assert main(["predict", str(test_folder), "--model", str(out / "best"), "--output", str(predictions),
                 "--device", "cpu"]) == 0
    frame = pd.read_csv(predictions)
    assert len(frame) == 45
    assert (frame["label"].to_numpy() == _labels_by_path(frame)).mean() == pytest.approx(card["test_accuracy"])


def test_search_without_test_split_says_its_number_is_the_selection_one(tmp_path, capsys):
    dataset = _layout(tmp_path / "ds", ("train", "val"))
    out = tmp_path / "run"
    assert main(["search", "--dataset", str(dataset), *TINY, "--trials", "1", "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no test split" in printed
    assert pd.read_csv(out / "leaderboard.csv")["test_accuracy"].isna().all()
    assert json.loads((out / "best" / "model.json").read_text())["test_accuracy"] is None


def test_leaderboard_scores_a_run_whose_test_score_is_missing(tmp_path, capsys):
    dataset = _layout(tmp_path / "ds", ("train", "test"))
    out = tmp_path / "run"
    assert main(["search", "--dataset", str(dataset), *TINY, "--trials", "1", "--epochs", "1", "--out", str(out)]) == 0
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="ds", storage=storage)
    scored = study.user_attrs[TEST_ATTR]
    study.set_user_attr(TEST_ATTR, None)  # as a study from before test scoring, or one stopped before its end
    capsys.readouterr()
    assert main(["leaderboard", str(out), "--format", "csv", "--device", "cpu"]) == 0
    frame = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert frame["test_accuracy"].iloc[0] == pytest.approx(scored["test_accuracy"])
    assert optuna.load_study(study_name="ds", storage=storage).user_attrs[TEST_ATTR] == scored


# --------------------------------------------------------------------------- test data cannot influence a choice

def _trial_record(trial: optuna.trial.FrozenTrial) -> tuple:
    return (trial.number, trial.state.name, tuple(sorted(trial.params.items())),
            tuple(sorted(trial.intermediate_values.items())), trial.value)


def _assert_same_trials(first: list, second: list) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a[:3] == b[:3]  # number, state (pruning decisions), sampled configuration
        assert [k for k, _ in a[3]] == [k for k, _ in b[3]]
        assert np.allclose([v for _, v in a[3]], [v for _, v in b[3]], atol=1e-6)  # val numbers per epoch


@pytest.mark.slow
def test_permuted_test_labels_change_no_choice_of_the_search(tmp_path):
    runs = {}
    for permuted in (False, True):
        root = tmp_path / f"permuted-{permuted}"
        manifest = _manifest(root, permute_test=permuted)
        out = root / "run"
        assert main(["search", "--dataset", str(manifest), "--backbones", "test_resnet,test_efficientnet",
                     "--no-pretrained", "--image-size", "32", "--device", "cpu", "--quiet", "--trials", "4",
                     "--epochs", "2", "--prerank", "logme", "--top-k", "2", "--out", str(out)]) == 0
        study = optuna.load_study(study_name="manifest", storage=f"sqlite:///{out / 'study.db'}")
        runs[permuted] = {
            "trials": [_trial_record(t) for t in study.get_trials()],
            "prerank": pd.read_csv(out / "prerank.csv"),
            "chosen": json.loads((out / "best" / "model.json").read_text()),
            "test": study.user_attrs[TEST_ATTR],
        }
    plain, permuted = runs[False], runs[True]
    _assert_same_trials(plain["trials"], permuted["trials"])
    pd.testing.assert_frame_equal(plain["prerank"].drop(columns=[c for c in plain["prerank"] if c.endswith("_s")]),
                                  permuted["prerank"].drop(columns=[c for c in permuted["prerank"] if c.endswith("_s")]),
                                  rtol=1e-5)
    assert plain["chosen"]["trial"] == permuted["chosen"]["trial"]
    assert plain["chosen"]["val_accuracy"] == pytest.approx(permuted["chosen"]["val_accuracy"], abs=1e-6)
    # The test split was scored in both, and its labels are what changed.
    assert plain["test"]["test_images"] == permuted["test"]["test_images"] == 45
    assert plain["test"]["trial"] == permuted["test"]["trial"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["autotransfer", "autotransfer-prerank", "random", "linear-probe", "seed-recipe"])
def test_permuted_test_labels_change_no_choice_of_a_bench_method(tmp_path, method):
    from autotransfer.bench.methods import MethodRun, run_method
    from autotransfer.bench.suite import Budget

    results = {}
    for permuted in (False, True):
        root = tmp_path / f"permuted-{permuted}"
        run = MethodRun(dataset=str(_manifest(root, permute_test=permuted)),
                        backbones=["test_resnet", "test_efficientnet"], weights={}, budget=Budget(3, None, 2),
                        seed=0, work=root / "work", image_size=32, pretrained=False, device="cpu",
                        options={"C": [0.1, 1.0]} if method == "linear-probe" else {})
        results[permuted] = run_method(method, run)
    plain, permuted = results[False], results[True]
    assert plain.best_config == permuted.best_config
    assert plain.best_val_accuracy == pytest.approx(permuted.best_val_accuracy, abs=1e-6)
    assert (plain.trials_complete, plain.trials_pruned, plain.trials_failed) == \
        (permuted.trials_complete, permuted.trials_pruned, permuted.trials_failed)
    assert np.allclose([v for _, v, _ in plain.curve], [v for _, v, _ in permuted.curve], atol=1e-6)
    assert plain.test_images == permuted.test_images == 45
    assert all(t is not None for _, _, t in plain.curve + permuted.curve)
    # what the test labels changed is the test number alone
    assert plain.test_accuracy is not None and permuted.test_accuracy is not None


def test_suite_val_as_test_must_name_a_suite_dataset(tmp_path):
    from autotransfer.bench.suite import parse_suite

    base = {"name": "s", "datasets": ["builtin:digits", "data/x"], "backbones": ["test_resnet"],
            "methods": ["seed-recipe"], "seeds": [0], "budget": {"trials": 1, "epochs": 1}}
    assert parse_suite({**base, "val_as_test": ["data/x"]}, tmp_path / "s.toml").val_as_test == ("data/x",)
    with pytest.raises(UserError, match="'val_as_test' names 'data/y', which is not in 'datasets'"):
        parse_suite({**base, "val_as_test": ["data/y"]}, tmp_path / "s.toml")
