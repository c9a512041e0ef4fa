"""A plugin implementing every hook, used by the tests through --plugin, AUTOTRANSFER_PLUGINS and an
installed entry point: a synthetic dataset scheme, a small backbone with its own stage groups, a
scorer, and lifecycle callbacks that append JSON lines to $STRIPES_EVENTS."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from autotransfer.backbones import ModuleProvider, Preprocessing
from autotransfer.data import LabelledRefs
from autotransfer.errors import UserError
from autotransfer.hookspecs import hookimpl
from autotransfer.scorers import Scorer

PREPROCESSING = Preprocessing(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=1.0)


class StripesSource:
    """`stripes:N`: N noisy 16x16 images of horizontal (class 'h') or vertical ('v') stripes."""

    name = "stripes"

    def can_load(self, uri: str) -> bool:
        return uri.startswith("stripes:")

    def load(self, uri: str) -> LabelledRefs:
        try:
            count = int(uri.split(":", 1)[1])
        except ValueError:
            raise UserError(f"{uri!r}: give stripes:N with N an integer") from None
        rng = np.random.default_rng(0)
        labels = np.arange(count) % 2
        images = []
        for label in labels:
            stripes = (np.arange(16) // 2 % 2 * 200).astype(np.float64)
            grid = np.tile(stripes[:, None], (1, 16)) if label == 0 else np.tile(stripes[None, :], (16, 1))
            noisy = np.clip(grid + rng.normal(0, 40, grid.shape), 0, 255).astype(np.uint8)
            images.append(noisy)
        return LabelledRefs("stripes", images, labels, ["h", "v"])


class StripeNet(nn.Module):
    """stem + two blocks, with timm-style coarse groups so it freezes stage-wise."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU()),
        )
        self.num_features = 12

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^blocks\.(\d+)"}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(images)).mean(dim=(2, 3))


def mean_feature_norm(features: np.ndarray, labels: np.ndarray, source_probs=None) -> float:
    return float(np.linalg.norm(features.mean(axis=0)))


def _record(event: str, **fields) -> None:
    path = os.environ.get("STRIPES_EVENTS")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"event": event, **fields}) + "\n")


@hookimpl
def autotransfer_dataset_sources() -> list:
    return [StripesSource()]


@hookimpl
def autotransfer_backbone_providers() -> list:
    return [ModuleProvider("stripenet", StripeNet, PREPROCESSING)]


@hookimpl
def autotransfer_scorers() -> list:
    return [Scorer("mean_feature_norm", mean_feature_norm, description="norm of the mean feature (test only)")]


@hookimpl
def autotransfer_trial_started(trial) -> None:
    _record("started", number=trial.number, backbone=trial.params["backbone"], study=trial.study_name,
            params=trial.params)


@hookimpl
def autotransfer_epoch_ended(trial, epoch) -> None:
    _record("epoch", number=trial.number, epoch=epoch.epoch, val_accuracy=epoch.val_accuracy)


@hookimpl
def autotransfer_trial_finished(trial, state, value, reason) -> None:
    if os.environ.get("STRIPES_FAIL_FINISHED"):
        raise RuntimeError("webhook unreachable")
    _record("finished", number=trial.number, state=state, value=value)
