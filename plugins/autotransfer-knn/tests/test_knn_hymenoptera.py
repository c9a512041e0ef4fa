"""Real data: on hymenoptera (ants vs bees), ImageNet-pretrained MobileNetV1-0.25 features must score
higher than the same architecture at random init. This is the ranking the scorer exists to make.

Needs ../shared (weights and the dataset) beside the checkout and the autotransfer-mobilenetv1 plugin;
skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[3].parent / "shared"  # the repository's ../shared
WEIGHTS = SHARED / "weights"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
BACKBONE = "mobilenetv1_025_leaky_in1k"
BACKBONE_PLUGIN = "autotransfer_mobilenetv1.hooks"
KNN_PLUGIN = "autotransfer_knn.hooks"
CLASSES = ("ants", "bees")
PER_CLASS = 40
IMAGE_SIZE = 160


def _missing() -> str | None:
    if not WEIGHTS.is_dir():
        return f"{WEIGHTS} is absent (no ../shared beside the checkout)"
    if not all((HYMENOPTERA / "val" / cls).is_dir() for cls in CLASSES):
        return f"{HYMENOPTERA}/val is absent"
    if importlib.util.find_spec("autotransfer_mobilenetv1") is None:
        return "autotransfer_mobilenetv1 is not importable (pip install -e plugins/autotransfer-mobilenetv1)"
    return None


pytestmark = [pytest.mark.shared, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


def _provider():
    from autotransfer.backbones import provider_for
    from autotransfer.plugins import registries

    return provider_for(BACKBONE, registries((BACKBONE_PLUGIN,)))


@pytest.fixture(scope="module")
def val_batch():
    """The first PER_CLASS val images of each class (by file name), decoded once as a search trial
    decodes them (short side to size / crop_pct, centre crop), uint8 (N, 3, S, S), and their labels."""
    import torch

    from autotransfer.data import decode_image

    decode_size = math.ceil(IMAGE_SIZE / _provider().describe(BACKBONE).preprocessing.crop_pct)
    images, labels = [], []
    for label, cls in enumerate(CLASSES):
        for file in sorted((HYMENOPTERA / "val" / cls).iterdir())[:PER_CLASS]:
            images.append(decode_image(file, decode_size))
            labels.append(label)
    return torch.stack(images), np.array(labels)


def _features(pretrained: bool, images) -> np.ndarray:
    """Pooled features of one forward pass in eval mode, the input every scorer gets."""
    import torch

    from autotransfer.backbones import WeightsRequest
    from autotransfer.data import eval_transform

    torch.manual_seed(0)
    backbone = _provider().create(BACKBONE, WeightsRequest(pretrained=pretrained))
    pre = backbone.preprocessing
    backbone.module.eval()
    with torch.no_grad():
        return backbone.module(eval_transform(images, IMAGE_SIZE, pre.mean, pre.std)).double().numpy()


def test_pretrained_features_score_higher_than_random_init(monkeypatch, val_batch):
    from autotransfer.scorers import score
    from autotransfer_mobilenetv1 import ENV_VAR

    monkeypatch.setenv(ENV_VAR, str(WEIGHTS))
    images, labels = val_batch
    pretrained, random = _features(True, images), _features(False, images)
    assert pretrained.shape == random.shape == (2 * PER_CLASS, 256)
    for name in ("knn_loo", "knn1_loo"):
        good = score(name, pretrained, labels, plugins=(KNN_PLUGIN,))
        bad = score(name, random, labels, plugins=(KNN_PLUGIN,))
        print(f"{name}: pretrained {good:.3f}, random init {bad:.3f}")
        assert good >= 0.7, f"{name}: pretrained features score {good:.3f}"
        assert good >= bad + 0.15, f"{name}: pretrained {good:.3f} vs random init {bad:.3f}"
