"""The real weights from ../shared/weights: exact loading, caching, and that they carry ImageNet knowledge.

Skipped when ../shared (beside the repository checkout) is absent. ImageNet itself is not here, so the
pretrained backbones are checked on hymenoptera (ants vs bees): their pooled features are far from a
random init's, a logistic-regression probe on them reaches >= 0.8 val accuracy (weights/README.md:
0.889 for leaky), and the leaky model's own ImageNet head tells ImageNet's "ant" (310) from "bee" (309).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from autotransfer.backbones import WeightsRequest
from autotransfer.errors import WeightsUnavailable
from autotransfer_mobilenetv1 import ENV_VAR, NAMES, MobileNetV1Provider, source_classifier
from autotransfer_mobilenetv1 import provider as provider_module
from autotransfer_mobilenetv1.provider import SPECS

SHARED = Path(__file__).resolve().parents[3].parent / "shared"  # the repository's ../shared
WEIGHTS = SHARED / "weights"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
LEAKY, KERAS = "mobilenetv1_025_leaky_in1k", "mobilenetv1_025_keras_in1k"
IMAGENET_ANT, IMAGENET_BEE = 310, 309
CLASSES = ("ants", "bees")

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not all((WEIGHTS / spec.file).is_file() for spec in SPECS.values()),
                       reason=f"{WEIGHTS} is absent (no ../shared beside the checkout)"),
]
needs_hymenoptera = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"{HYMENOPTERA} is absent")


@pytest.fixture
def weights_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(WEIGHTS))


def _file_state(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(WEIGHTS / SPECS[name].file))


# --------------------------------------------------------------------------- loading

@pytest.mark.parametrize("name", NAMES)
def test_loaded_tensors_equal_the_files(weights_env, name):
    backbone = MobileNetV1Provider().create(name, WeightsRequest(pretrained=True))
    assert backbone.source == f"file:{WEIGHTS / SPECS[name].file}"
    file_state = _file_state(name)
    features = {k: v for k, v in file_state.items() if not k.startswith("classifier.")}
    assert (len(file_state) - len(features)) == (2 if SPECS[name].has_classifier else 0)
    module_state = backbone.module.state_dict()
    assert set(module_state) == set(features)
    for key, value in module_state.items():
        assert torch.equal(value, features[key].reshape(value.shape)), key


def test_templates_are_read_once_and_copied(weights_env, monkeypatch):
    calls = []
    real = provider_module.load_state
    monkeypatch.setattr(provider_module, "load_state", lambda *a: calls.append(a) or real(*a))
    provider = MobileNetV1Provider()
    request = WeightsRequest(pretrained=True)
    first, second = provider.create(LEAKY, request), provider.create(LEAKY, request)
    assert len(calls) == 1
    assert first.module is not second.module
    with torch.no_grad():
        first.module.conv_stem.weight.zero_()
    assert torch.equal(second.module.conv_stem.weight, _file_state(LEAKY)["conv_stem.weight"])
    assert provider.create(LEAKY, WeightsRequest(pretrained=False)).source == "random init"
    assert len(calls) == 1


def test_weights_file_is_used_instead_of_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "empty"))  # the folder would fail
    copy = tmp_path / "mine.safetensors"
    shutil.copyfile(WEIGHTS / SPECS[LEAKY].file, copy)
    backbone = MobileNetV1Provider().create(LEAKY, WeightsRequest(pretrained=True, file=str(copy)))
    assert backbone.source == f"file:{copy}"
    assert torch.equal(backbone.module.conv_stem.weight, _file_state(LEAKY)["conv_stem.weight"])
    head = source_classifier(LEAKY, WeightsRequest(pretrained=True, file=str(copy)))
    assert torch.equal(head.weight, _file_state(LEAKY)["classifier.weight"])


def test_the_other_backbones_published_file_is_refused(monkeypatch):
    """Both files fit both architectures shape-wise; the sha256 tells them apart."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    for name, other in ((LEAKY, KERAS), (KERAS, LEAKY)):
        with pytest.raises(WeightsUnavailable, match=f"--weights {other}=PATH"):
            MobileNetV1Provider().create(name, WeightsRequest(pretrained=True, file=str(WEIGHTS / SPECS[other].file)))


def test_source_classifier_is_the_files_head(weights_env):
    head = source_classifier(LEAKY)
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (256, 1000)
    state = _file_state(LEAKY)
    assert torch.equal(head.weight, state["classifier.weight"]) and torch.equal(head.bias, state["classifier.bias"])
    assert source_classifier(KERAS) is None


# --------------------------------------------------------------------------- ImageNet knowledge on hymenoptera

@pytest.fixture(scope="module")
def crops() -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Centre crops (224 of a 256 short side, crop_pct 0.875) in [0, 1], decoded once for both models."""
    from PIL import Image
    from torchvision import transforms as T

    size = 224
    to_crop = T.Compose([T.Resize(math.ceil(size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                         T.CenterCrop(size), T.ToTensor()])
    out = {}
    for split in ("train", "val"):
        images, labels = [], []
        for label, cls in enumerate(CLASSES):
            for file in sorted((HYMENOPTERA / split / cls).iterdir()):
                with Image.open(file) as image:
                    images.append(to_crop(image.convert("RGB")))
                labels.append(label)
        out[split] = (torch.stack(images), np.array(labels))
    return out


def _features(module: torch.nn.Module, images: torch.Tensor, mean, std) -> torch.Tensor:
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    module.eval()
    with torch.no_grad():
        return torch.cat([module((batch - mean) / std) for batch in images.split(64)])


@needs_hymenoptera
@pytest.mark.parametrize("name", NAMES)
def test_pretrained_features_transfer(weights_env, crops, name):
    from sklearn.linear_model import LogisticRegression

    provider = MobileNetV1Provider()
    pre = provider.describe(name).preprocessing
    train_x, train_y = crops["train"]
    val_x, val_y = crops["val"]
    assert len(train_y) == 245 and len(val_y) == 153

    # 20 val images (10 ants, 10 bees): pretrained features are nothing like a random init's
    few = torch.cat([val_x[:10], val_x[-10:]])
    pretrained = _features(provider.create(name, WeightsRequest(pretrained=True)).module, few, pre.mean, pre.std)
    torch.manual_seed(0)
    random = _features(provider.create(name, WeightsRequest(pretrained=False)).module, few, pre.mean, pre.std)
    assert pretrained.shape == random.shape == (20, 256)
    assert ((pretrained - random).norm() / pretrained.norm()).item() > 0.5
    # pretrained features vary from image to image; a random init's barely do
    assert pretrained.std(0).mean().item() > 10 * random.std(0).mean().item()

    # linear probe: weights/README.md measured 0.889 for leaky
    backbone = provider.create(name, WeightsRequest(pretrained=True)).module
    train_f = _features(backbone, train_x, pre.mean, pre.std).numpy()
    val_f = _features(backbone, val_x, pre.mean, pre.std)
    probe = LogisticRegression(max_iter=2000).fit(train_f, train_y)
    accuracy = probe.score(val_f.numpy(), val_y)
    assert accuracy >= 0.8, f"{name}: linear probe val accuracy {accuracy:.3f} < 0.8"

    head = source_classifier(name)
    if head is not None:  # the ImageNet head itself: ant vs bee logits decide the label
        with torch.no_grad():
            logits = head(val_f)
        picked = torch.where(logits[:, IMAGENET_ANT] > logits[:, IMAGENET_BEE], 0, 1).numpy()
        assert (picked == val_y).mean() >= 0.8


@needs_hymenoptera
def test_search_runs_with_the_real_weights(weights_env, tmp_path):
    """The acceptance path in small: a CLI search over both names trains on the published weights
    and the leaderboard says they were pretrained (not a user --weights file, not random init)."""
    import optuna
    import pandas as pd

    from autotransfer.cli import main

    out = tmp_path / "run"
    assert main(["search", "--dataset", str(HYMENOPTERA), "--backbones", f"{LEAKY},{KERAS}", "--trials", "2",
                 "--epochs", "1", "--image-size", "96", "--frozen-stages", "all", "--heads", "linear",
                 "--lr", "3e-3", "--pruner", "none", "--out", str(out), "--quiet"]) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    assert (board["state"] == "COMPLETE").all() and (board["pretrained"] == "pretrained").all()
    study = optuna.load_study(study_name="hymenoptera", storage=f"sqlite:///{out / 'study.db'}")
    for trial in study.trials:
        name = trial.params["backbone"]
        assert trial.user_attrs["weights_source"] == f"file:{WEIGHTS / SPECS[name].file}"
