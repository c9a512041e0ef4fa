"""Two-phase transfer offline: `autotransfer pretrain` on one half of digits, then a search on the
other half that uses the checkpoint as a backbone (by path, by zoo name, or as --weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from autotransfer.backbones import WeightsRequest, provider_for
from autotransfer.backbones.checkpoints import BACKBONE_FILE, HEAD_FILE, MANIFEST, read_manifest
from autotransfer.cli import main
from autotransfer.plugins import registries
from autotransfer.predict import predict
from autotransfer.devices import resolve_device
from autotransfer.testing import reset_registries
from conftest import main_error, run_cli

ARCH = "test_efficientnet"
TARGET = ["--dataset", "builtin:digits:5-9", "--no-pretrained", "--trials", "2", "--epochs", "1",
          "--image-size", "32", "--pruner", "none", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pretrain") / "digits-0-4"
    assert main(["pretrain", "--dataset", "builtin:digits:0-4", "--backbone", ARCH, "--no-pretrained",
                 "--epochs", "2", "--image-size", "32", "--out", str(folder), "--quiet"]) == 0
    return folder


def test_checkpoint_files_and_manifest(checkpoint):
    assert {p.name for p in checkpoint.iterdir()} == {BACKBONE_FILE, HEAD_FILE, MANIFEST}
    manifest = read_manifest(checkpoint)
    assert manifest.architecture == ARCH and manifest.source_classes == ["0", "1", "2", "3", "4"]
    assert manifest.image_size == 32 and manifest.training["init"] == "random init"
    assert 0.0 <= manifest.val_accuracy <= 1.0
    head = load_file(str(checkpoint / HEAD_FILE))
    assert head["weight"].shape == (5, manifest.num_features)
    # The backbone file holds every backbone tensor and nothing of the head.
    provider = provider_for(ARCH, registries())
    fresh = provider.create(ARCH, WeightsRequest(pretrained=False)).module.state_dict()
    assert set(load_file(str(checkpoint / BACKBONE_FILE))) == set(fresh)


@pytest.mark.slow
def test_pretraining_from_random_init_is_reproducible_from_its_seed(tmp_path):
    args = ["pretrain", "--dataset", "builtin:digits:0-4", "--backbone", ARCH, "--no-pretrained", "--epochs", "1",
            "--image-size", "32", "--quiet"]
    for name in ("first", "second"):  # separate processes: nothing shared but the seed
        assert run_cli(*args, "--out", str(tmp_path / name)).returncode == 0
    for file in (BACKBONE_FILE, HEAD_FILE):
        first, second = load_file(str(tmp_path / "first" / file)), load_file(str(tmp_path / "second" / file))
        assert first.keys() == second.keys()
        for key in first:
            torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


@pytest.mark.slow
def test_search_uses_checkpoint_next_to_random_init(checkpoint, tmp_path):
    out = tmp_path / "target"
    result = run_cli("search", *TARGET, "--backbones", f"{ARCH},{checkpoint}", "--trials", "4", "--out", str(out),
                     "--features", "final")  # an opening of 3 leaves the sampler a trial for random init
    assert result.returncode == 0, result.stderr
    board = pd.read_csv(out / "leaderboard.csv")
    kinds = set(zip(board["backbone"], board["pretrained"]))
    assert kinds == {(ARCH, "random init"), (str(checkpoint), "checkpoint")}  # both compared in one study
    table = pd.read_csv(out / "per_backbone.csv")
    assert set(zip(table["backbone"], table["pretrained"])) == kinds
    complete = board[board["state"] == "COMPLETE"]
    for row in table.itertuples():
        mine = complete[complete["backbone"] == row.backbone]["val_accuracy"]
        assert (pd.isna(row.best_val_accuracy) and mine.empty) or row.best_val_accuracy == pytest.approx(mine.max())
    assert "best per backbone" in result.stdout
    card = json.loads((out / "best" / "model.json").read_text())
    expected_source = f"checkpoint:{checkpoint}" if card["backbone"] == str(checkpoint) else "random init"
    assert card["weights_source"] == expected_source


def test_checkpoint_weights_reach_the_trial(checkpoint):
    found = registries()
    backbone = provider_for(str(checkpoint), found).create(str(checkpoint), WeightsRequest(pretrained=False))
    saved = load_file(str(checkpoint / BACKBONE_FILE))
    assert all(torch.equal(v, saved[k]) for k, v in backbone.module.state_dict().items())
    assert backbone.source == f"checkpoint:{checkpoint}"
    assert backbone.preprocessing.input_size == 32  # the size it was pretrained at
    classifier = provider_for(str(checkpoint), found).source_classifier(str(checkpoint))
    assert classifier.out_features == 5


@pytest.mark.slow
def test_zoo_name_and_weights_flag(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTRANSFER_ZOO", str(checkpoint.parent))
    reset_registries()
    out = tmp_path / "zoo"
    assert main(["search", *TARGET, "--backbones", checkpoint.name, "--trials", "1", "--out", str(out)]) == 0
    assert pd.read_csv(out / "leaderboard.csv").loc[0, "pretrained"] == "checkpoint"
    out = tmp_path / "weights"
    assert main(["search", *TARGET, "--backbones", ARCH, "--weights", f"{ARCH}={checkpoint}", "--trials", "1",
                 "--out", str(out)]) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    assert board.loc[0, "pretrained"] == "file"


def test_predict_with_a_checkpoint_backbone(checkpoint, tmp_path):
    out = tmp_path / "p"
    assert main(["search", *TARGET, "--backbones", str(checkpoint), "--trials", "1", "--out", str(out)]) == 0
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(4):
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).save(images / f"{i}.png")
    frame = predict(out / "best", [str(images)], registries(), resolve_device("cpu"))
    assert len(frame) == 4 and set(frame["label"]) <= {"5", "6", "7", "8", "9"}


def test_bad_pretrain_and_checkpoint_inputs(checkpoint, tmp_path, capsys):  # in-process (conftest.py)
    message = main_error(capsys, "pretrain", "--dataset", "builtin:digits:0-4", "--backbone", ARCH,
                         "--no-pretrained", "--out", str(checkpoint))
    assert "already holds a checkpoint" in message
    message = main_error(capsys, "search", *TARGET, "--backbones", "test_resnet",
                         "--weights", f"test_resnet={checkpoint}", "--out", str(tmp_path / "a"))
    assert f"holds a '{ARCH}' backbone" in message and f"--weights {ARCH}={checkpoint}" in message
    message = main_error(capsys, "search", *TARGET, "--dataset", "builtin:digits:7", "--backbones", ARCH,
                         "--out", str(tmp_path / "b"))
    assert "builtin:digits:0-4" in message

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for item in checkpoint.iterdir():
        (tampered / item.name).write_bytes(item.read_bytes())
    state = load_file(str(tampered / BACKBONE_FILE))
    first = next(iter(state))
    state[first] = state[first] + 1
    from safetensors.torch import save_file

    save_file(state, str(tampered / BACKBONE_FILE))
    message = main_error(capsys, "search", *TARGET, "--backbones", str(tampered), "--out", str(tmp_path / "c"))
    assert "sha256" in message and str(tampered) in message
