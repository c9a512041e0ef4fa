"""A backbone that runs out of GPU memory on purpose, so the out-of-memory handling runs on CPU.

`oomnet` raises `torch.cuda.OutOfMemoryError` in a training forward pass over more than
`OOM_LIMIT` images (8), as a too-large batch would on a real GPU. A trial callback makes it fail
at every batch size in the trials listed in `$OOM_ALWAYS_TRIALS` (comma list of numbers), as a
model too large for the GPU would.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from autotransfer.backbones import ModuleProvider, Preprocessing
from autotransfer.hookspecs import hookimpl

OOM_LIMIT = 8
PREPROCESSING = Preprocessing(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=1.0)
state = {"limit": OOM_LIMIT}


class OomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU()))
        self.num_features = 12

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^blocks\.(\d+)"}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and images.shape[0] > state["limit"]:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate a batch of {images.shape[0]} images (limit {state['limit']})")
        return self.blocks(self.stem(images)).mean(dim=(2, 3))


@hookimpl
def autotransfer_backbone_providers() -> list:
    return [ModuleProvider("oomnet", OomNet, PREPROCESSING)]


@hookimpl
def autotransfer_trial_started(trial) -> None:
    always = {int(n) for n in os.environ.get("OOM_ALWAYS_TRIALS", "").split(",") if n.strip()}
    state["limit"] = 0 if trial.number in always else OOM_LIMIT
