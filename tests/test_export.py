"""A portable best/ and `autotransfer export`: a copied best/ of a search whose backbone is a `pretrain`
checkpoint predicts from another folder without that checkpoint, and its ONNX and TorchScript exports
give `predict`'s labels and probabilities on the same images."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autotransfer.cli import main
from autotransfer.devices import resolve_device
from autotransfer.export import FORMATS, SUFFIX, TOLERANCE, prepare_images, run_exported
from autotransfer.model import load_model, read_card
from autotransfer.plugins import registries
from autotransfer.predict import collect_images, decode_chunks, label_images, predict
from autotransfer.testing import reset_registries
from conftest import main_error

IMAGES = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint pretrained on digits 0-4, a search on 5-9 with it as the only backbone, 20 image files."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("export")
    source, out = root / "source", root / "search"
    assert main(["pretrain", "--dataset", "builtin:digits:0-4", "--backbone", "test_resnet", "--no-pretrained",
                 "--epochs", "1", "--image-size", "32", "--out", str(source), "--quiet"]) == 0
    assert main(["search", "--dataset", "builtin:digits:5-9", "--backbones", str(source), "--trials", "2",
                 "--epochs", "1", "--image-size", "32", "--frozen-stages", "0-2", "--no-portfolio", "--out", str(out),
                 "--quiet"]) == 0
    digits = load_digits()
    images = root / "images"
    images.mkdir()
    picked = np.flatnonzero(digits.target >= 5)[:IMAGES]
    for i in picked:
        grey = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(grey).convert("RGB").resize((24, 24), Image.NEAREST).save(images / f"d{i:04d}.png")
    return {"source": source, "best": out / "best", "images": images, "root": root}


@pytest.mark.slow
def test_a_copied_best_predicts_from_another_folder_without_its_checkpoint(run, monkeypatch):
    found = registries(())
    original = predict(run["best"], [str(run["images"])], found, resolve_device("cpu"))
    card = read_card(run["best"])
    assert card.backbone == str(run["source"]) and card.architecture == "test_resnet"

    copy = run["root"] / "elsewhere" / "model"
    shutil.copytree(run["best"], copy)
    moved = run["source"].with_name("source-moved")
    run["source"].rename(moved)  # the checkpoint the search trained from is gone
    try:
        (run["root"] / "other").mkdir()
        monkeypatch.chdir(run["root"] / "other")
        reset_registries()
        again = predict(Path("../elsewhere/model"), [str(run["images"])], registries(()), resolve_device("cpu"))
    finally:
        moved.rename(run["source"])
    assert again["label"].tolist() == original["label"].tolist()
    assert np.allclose(again["confidence"], original["confidence"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_exports_give_predicts_labels_and_probabilities_on_20_images(run, tmp_path, fmt, capsys):
    output = tmp_path / f"served{SUFFIX[fmt]}"
    assert main(["export", "--model", str(run["best"]), "--format", fmt, "--output", str(output)]) == 0
    assert f"wrote {output}" in capsys.readouterr().err
    contract = json.loads(output.with_name(output.name + ".json").read_text())
    card = read_card(run["best"])
    assert contract["class_names"] == card.class_names and contract["input_shape"] == ["N", 3, card.image_size,
                                                                                        card.image_size]
    files = collect_images([str(run["images"])])
    assert len(files) == IMAGES
    shown = predict(run["best"], [str(run["images"])], registries(()), resolve_device("cpu"))

    index, crops = prepare_images(files, card)  # the pixels predict feeds the model, as the contract says
    exported = run_exported(output, fmt, crops)
    assert [card.class_names[k] for k in exported.argmax(axis=1)] == shown["label"].tolist()
    assert np.abs(exported.max(axis=1) - shown["confidence"].to_numpy()).max() <= TOLERANCE

    model, _ = load_model(run["best"], registries(()))
    expected = torch.cat([label_images(model, card, images, torch.device("cpu"))
                          for _, images in decode_chunks(files, card.decode_size)]).numpy()
    assert index == list(range(IMAGES)) and np.abs(exported - expected).max() <= TOLERANCE


def test_export_bad_input_is_one_line(tmp_path, capsys):
    line = main_error(capsys, "export", "--model", str(tmp_path), "--format", "onnx")
    assert "is not a saved autotransfer model" in line
    line = main_error(capsys, "export", "--model", str(tmp_path), "--format", "tflite")
    assert "invalid choice: 'tflite'" in line


@pytest.mark.slow
def test_a_copied_best_exports_without_its_checkpoint_and_agrees_with_predict(run, tmp_path, monkeypatch, capsys):
    files = collect_images([str(run["images"])])
    shown = predict(run["best"], [str(run["images"])], registries(()), resolve_device("cpu"))
    shutil.copytree(run["best"], tmp_path / "copy" / "best")
    moved = run["source"].with_name("source-gone")
    run["source"].rename(moved)
    try:
        (tmp_path / "cwd").mkdir()
        monkeypatch.chdir(tmp_path / "cwd")
        reset_registries()
        assert main(["export", "--model", "../copy/best", "--format", "onnx"]) == 0
    finally:
        moved.rename(run["source"])
    assert "wrote ../copy/best/model.onnx" in capsys.readouterr().err
    card = read_card(tmp_path / "copy" / "best")
    _, crops = prepare_images(files, card)
    exported = run_exported(tmp_path / "copy" / "best" / "model.onnx", "onnx", crops)
    assert [card.class_names[k] for k in exported.argmax(axis=1)] == shown["label"].tolist()
    assert np.abs(exported.max(axis=1) - shown["confidence"].to_numpy()).max() <= TOLERANCE


@pytest.mark.slow
def test_exported_onnx_takes_any_batch_size(run, tmp_path):
    output = tmp_path / "model.onnx"
    assert main(["export", "--model", str(run["best"]), "--format", "onnx", "--output", str(output)]) == 0
    card = read_card(run["best"])
    _, crops = prepare_images(collect_images([str(run["images"])]), card)
    whole = run_exported(output, "onnx", crops)
    one_by_one = np.concatenate([run_exported(output, "onnx", crops[i:i + 1]) for i in range(len(crops))])
    assert whole.shape == (IMAGES, card.num_classes) and np.abs(whole - one_by_one).max() <= 1e-5
    assert np.allclose(whole.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_to_an_unwritable_output_is_one_line_and_leaves_nothing(run, tmp_path, fmt, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = main_error(capsys, "export", "--model", str(run["best"]), "--format", fmt,
                      "--output", str(blocker / "sub" / f"model{SUFFIX[fmt]}"))
    assert f"{blocker} is a file, not a folder" in line
    line = main_error(capsys, "export", "--model", str(run["best"]), "--format", fmt, "--output", str(tmp_path))
    assert "is a folder; give a file name" in line
    if Path("/proc/self").is_dir():  # a folder no one may create files in, root included (chmod does not stop root)
        line = main_error(capsys, "export", "--model", str(run["best"]), "--format", fmt,
                          "--output", f"/proc/model{SUFFIX[fmt]}")
        assert line.startswith(f"autotransfer: error: cannot write --output /proc/model{SUFFIX[fmt]}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_onnx_export_without_its_packages_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without the package imports
    line = main_error(capsys, "export", "--model", str(tmp_path), "--format", "onnx")
    assert "needs onnxruntime" in line and "pip install 'autotransfer[export]'" in line


@pytest.mark.slow
def test_an_old_card_without_architecture_still_loads_from_its_checkpoint(run, tmp_path):
    old = tmp_path / "old-best"
    shutil.copytree(run["best"], old)
    data = json.loads((old / "model.json").read_text())
    del data["architecture"]  # what searches wrote before the field existed
    (old / "model.json").write_text(json.dumps(data))
    assert read_card(old).architecture is None
    found = registries(())
    before = predict(run["best"], [str(run["images"])], found, resolve_device("cpu"))
    after = predict(old, [str(run["images"])], found, resolve_device("cpu"))
    assert after["label"].tolist() == before["label"].tolist()
    assert np.allclose(after["confidence"], before["confidence"], atol=1e-6)
