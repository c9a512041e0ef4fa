"""Feature extraction and its cache, `autotransfer rank`, and the scorer-guided search."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from autotransfer.backbones import WeightsRequest, provider_for
from autotransfer.cli import main
from autotransfer.config import SearchConfig
from autotransfer.data import BuiltinSource, prepare
from autotransfer.cache.features import FeatureCache, extract
from autotransfer.plugins import registries
from autotransfer.rank import scorer_tau
from autotransfer.search import PRERANK_ATTR
from autotransfer.space import first_trial
from autotransfer.trainer import TrialInputs
from conftest import SHARED, main_error

HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
WEIGHTS = SHARED / "weights"
INPUTS = TrialInputs(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def digits_train():
    refs = BuiltinSource().load("builtin:digits:0-2")
    return prepare(refs, 32, val_fraction=0.5, seed=0).train


def test_features_are_cached_by_weights_pixels_and_preprocessing(digits_train, tmp_path):
    provider = provider_for("test_efficientnet", registries())
    torch.manual_seed(0)
    backbone = provider.create("test_efficientnet", WeightsRequest(pretrained=False)).module
    cache = FeatureCache(tmp_path)
    first = extract(backbone, None, digits_train, INPUTS, torch.device("cpu"), cache)
    assert not first.cached and first.features.shape == (len(digits_train), 256)
    again = extract(backbone, None, digits_train, INPUTS, torch.device("cpu"), cache)
    assert again.cached and np.array_equal(again.features, first.features)
    assert again.seconds == pytest.approx(first.seconds, rel=1e-5)
    assert np.array_equal(again.labels, digits_train.labels.numpy())
    # Each thing the features depend on changes the key.
    other_norm = TrialInputs(32, 32, (0.4, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert not extract(backbone, None, digits_train, other_norm, torch.device("cpu"), cache).cached
    with torch.no_grad():
        next(backbone.parameters()).add_(1e-3)
    assert not extract(backbone, None, digits_train, INPUTS, torch.device("cpu"), cache).cached
    fewer = type(digits_train)(digits_train.labels[:-1], images=digits_train.images[:-1], decode_size=32)
    assert not extract(backbone, None, fewer, INPUTS, torch.device("cpu"), cache).cached
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_features_match_a_plain_forward_pass(digits_train, tmp_path):
    from autotransfer.data import eval_transform

    torch.manual_seed(1)
    backbone = provider_for("test_resnet", registries()).create("test_resnet", WeightsRequest(pretrained=False)).module
    head = torch.nn.Linear(backbone.num_features, 7)
    found = extract(backbone, head, digits_train, INPUTS, torch.device("cpu"), FeatureCache(tmp_path))
    with torch.no_grad():
        backbone.eval()
        plain = backbone(eval_transform(digits_train.images, 32, INPUTS.mean, INPUTS.std))
        probs = head(plain).softmax(dim=1)
    assert np.allclose(found.features, plain.numpy(), atol=1e-5)
    assert np.allclose(found.source_probs, probs.numpy(), atol=1e-6)


def test_rank_command_table(tmp_path, capsys):
    out = tmp_path / "rank"
    assert main(["rank", "--dataset", "builtin:digits:0-3", "--backbones", "test_resnet,test_efficientnet",
                 "--no-pretrained", "--scorers", "hscore,leep,nce", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| rank" in printed and "n/a" in printed  # random-init timm models have no source head
    frame = pd.read_csv(out / "rank.csv")
    assert list(frame.columns) == ["rank", "backbone", "pretrained", "hscore", "leep", "nce", "num_features",
                                   "extract_s", "cached"]
    assert set(frame["backbone"]) == {"test_resnet", "test_efficientnet"}
    assert frame["hscore"].is_monotonic_decreasing and frame["leep"].isna().all()
    assert (frame["extract_s"] > 0).all() and not frame["cached"].any()
    assert main(["rank", "--dataset", "builtin:digits:0-3", "--backbones", "test_resnet,test_efficientnet",
                 "--no-pretrained", "--scorers", "hscore", "--out", str(out), "--format", "csv"]) == 0
    said = capsys.readouterr().err.splitlines()  # not silent while it loads, decodes and extracts
    assert said[:2] == ["loading test_resnet (random init)", "loading test_efficientnet (random init)"]
    assert any(line.startswith("scoring test_efficientnet: features of") for line in said)
    assert "  test_resnet: features read from the cache" in said
    again = pd.read_csv(out / "rank.csv")
    assert again["cached"].all()  # same weights (seeded random init), pixels and preprocessing
    assert np.allclose(again.set_index("backbone")["hscore"], frame.set_index("backbone")["hscore"])


@pytest.mark.parametrize("args, needle", [
    (["rank", "--dataset", "builtin:digits", "--backbones", "test_resnet", "--no-pretrained", "--scorers", "logmee"],
     "unknown scorer 'logmee'"),
    (["rank", "--dataset", "builtin:digits", "--backbones", "test_resnet", "--no-pretrained", "--scorers", "hscore",
      "--by", "leep"], "--by 'leep' is not among --scorers"),
    (["search", "--dataset", "builtin:digits", "--backbones", "test_resnet", "--no-pretrained", "--top-k", "1"],
     "--top-k needs --prerank"),
    (["search", "--dataset", "builtin:digits", "--backbones", "test_resnet", "--no-pretrained", "--prerank", "hscore",
      "--top-k", "3"], "--top-k must lie in 1..1"),
    (["search", "--dataset", "builtin:digits", "--backbones", "test_resnet", "--no-pretrained", "--prerank", "logmee"],
     "unknown scorer 'logmee'"),
])
def test_bad_ranking_input_is_one_line(tmp_path, capsys, args, needle):
    assert needle in main_error(capsys, *args, "--out", str(tmp_path / "o"))  # in-process (conftest.py)


def test_first_trial_stays_inside_the_space():
    config = SearchConfig(dataset="x", backbones=["a"], frozen_stages="0-all", lr=(1e-5, 1e-1)).validate()
    assert first_trial(config, "a", 5) == {"backbone": "a", "frozen_stages": 4, "head": "linear", "lr": 1e-3,
                                           "optimizer": "adam"}
    config = SearchConfig(dataset="x", backbones=["a"], frozen_stages="0,2,all", heads=["mlp"], head_hidden=[64],
                          lr=(1e-2, 1e-1), optimizers=["sgd"]).validate()
    assert first_trial(config, "a", 5) == {"backbone": "a", "frozen_stages": "all", "head": "mlp", "head_hidden": 64,
                                           "head_dropout": 0.0, "lr": 1e-2, "optimizer": "sgd"}
    config = SearchConfig(dataset="x", backbones=["a"], frozen_stages="1-2", lr=(3e-4, 3e-4)).validate()
    assert first_trial(config, "a", 5) == {"backbone": "a", "frozen_stages": 2, "head": "linear", "optimizer": "adam"}


def test_scorer_tau_against_known_orders():
    scores = pd.DataFrame({"backbone": ["a", "b", "c", "d"], "good": [4.0, 3.0, 2.0, 1.0],
                           "reversed": [1.0, 2.0, 3.0, 4.0], "partial": [1.0, None, None, None]})
    best = pd.Series({"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6})
    tau = scorer_tau(scores, best, ["good", "reversed", "partial"]).set_index("scorer")
    assert tau.loc["good", "weighted_tau"] == pytest.approx(1.0)
    assert tau.loc["reversed", "weighted_tau"] == pytest.approx(-1.0)
    assert np.isnan(tau.loc["partial", "weighted_tau"]) and tau.loc["partial", "backbones"] == 1


@pytest.mark.slow
def test_guided_search_keeps_the_top_k_and_records_tau(tmp_path, capsys):
    out = tmp_path / "guided"
    args = ["search", "--dataset", "builtin:digits:0-3", "--backbones", "test_resnet,test_efficientnet,test_vit",
            "--no-pretrained", "--prerank", "hscore", "--top-k", "2", "--epochs", "1", "--image-size", "32",
            "--pruner", "none", "--out", str(out), "--quiet"]
    assert main([*args, "--trials", "3"]) == 0
    prerank = pd.read_csv(out / "prerank.csv")
    kept = prerank.loc[prerank["kept"], "backbone"].tolist()
    assert len(kept) == 2 and prerank["rank"].tolist() == [1, 2, 3]
    assert kept == prerank["backbone"].tolist()[:2]  # the best two by hscore
    board = pd.read_csv(out / "leaderboard.csv")
    assert set(board["backbone"]) <= set(kept)
    study = optuna.load_study(study_name="digits-0-3", storage=f"sqlite:///{out / 'study.db'}")
    opening = sorted(study.trials, key=lambda t: t.number)[:2]
    assert [t.params["backbone"] for t in opening] == kept  # one enqueued first trial per kept backbone
    assert all(t.params["head"] == "linear" and t.params["optimizer"] == "adam" for t in opening)
    tau = pd.read_csv(out / "scorer_tau.csv")
    assert "hscore" in set(tau["scorer"]) and (tau["backbones"] <= 2).all()
    stored = study.user_attrs[PRERANK_ATTR]
    assert stored["kept"] == kept and stored["by"] == "hscore"

    # Resuming reuses the stored choice: no new scoring, same kept backbones.
    before = (out / "prerank.csv").stat().st_mtime_ns
    assert main([*args, "--trials", "4"]) == 0
    assert (out / "prerank.csv").stat().st_mtime_ns == before
    assert set(pd.read_csv(out / "leaderboard.csv")["backbone"]) <= set(kept)
    assert json.loads(json.dumps(study.user_attrs[PRERANK_ATTR]))  # stored as plain JSON


needs_plugin_data = pytest.mark.skipif(
    not (HYMENOPTERA.is_dir() and (WEIGHTS / "mobilenetv1_025_leaky_in1k.safetensors").is_file()),
    reason=f"{HYMENOPTERA} or {WEIGHTS} is absent (no ../shared beside the checkout)")


@pytest.mark.slow
@needs_plugin_data
def test_rank_puts_pretrained_above_random_init_on_hymenoptera(tmp_path, monkeypatch):
    pytest.importorskip("autotransfer_mobilenetv1")
    monkeypatch.setenv("AUTOTRANSFER_MOBILENETV1_WEIGHTS", str(WEIGHTS))
    from autotransfer.testing import reset_registries

    reset_registries()
    out = tmp_path / "hym"
    backbones = "mobilenetv1_025_leaky_in1k,mobilenetv1_025_keras_in1k,resnet18"
    assert main(["rank", "--dataset", str(HYMENOPTERA), "--backbones", backbones, "--weights", "resnet18=random",
                 "--image-size", "128", "--out", str(out), "--quiet"]) == 0
    frame = pd.read_csv(out / "rank.csv").set_index("backbone")
    assert frame.loc["resnet18", "pretrained"] == "random init"
    for scorer in ("logme", "hscore_shrink", "nleep"):
        assert frame.loc["resnet18", scorer] < frame.loc["mobilenetv1_025_leaky_in1k", scorer], scorer
        assert frame.loc["resnet18", scorer] < frame.loc["mobilenetv1_025_keras_in1k", scorer], scorer
    # Source-label scorers run where a source head exists, and only there.
    assert np.isfinite(frame.loc["mobilenetv1_025_leaky_in1k", ["leep", "nce"]].astype(float)).all()
    assert frame.loc[["mobilenetv1_025_keras_in1k", "resnet18"], ["leep", "nce"]].isna().all().all()
