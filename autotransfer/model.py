"""A backbone plus a new head, with frozen stages held in eval mode; saving and loading it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backbones import Backbone, WeightsRequest, freeze, frozen_submodules, provider_for
from .checkpoints import publish_permissions
from .heads import HeadConfig, build_head

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


class TransferModel(nn.Module):
    """Images -> class logits. Frozen stages get no gradients and keep BatchNorm statistics."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self._frozen: list[nn.Module] = []

    def freeze_stages(self, stages: list[list[str]], k: int) -> None:
        freeze(self.backbone, stages, k)
        self._frozen = frozen_submodules(self.backbone)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def parameter_counts(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@dataclass
class ModelCard:
    """Everything needed to rebuild and feed a saved model."""

    backbone: str
    weights_source: str
    pretrained: bool
    head: dict
    frozen_stages: int
    class_names: list[str]
    image_size: int
    resize_size: int
    decode_size: int
    mean: list[float]
    std: list[float]
    val_accuracy: float | None = None  # what chose this model among the trials: optimistic
    trial: int | None = None
    test_accuracy: float | None = None  # on the test split, scored once after the choice; None without one
    test_images: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def assemble(backbone: Backbone, head: HeadConfig, num_classes: int, frozen_stages: int) -> TransferModel:
    model = TransferModel(backbone.module, build_head(head, backbone.num_features, num_classes))
    model.freeze_stages(backbone.stages, frozen_stages)
    return model


def save_model(model: TransferModel, card: ModelCard, directory: Path) -> None:
    """Write weights + card to a fresh folder, then swap it in, so readers never see half a model."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(staging / MODEL_FILE))
    (staging / CONFIG_FILE).write_text(json.dumps(card.__dict__, indent=2) + "\n")
    publish_permissions(staging)
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}-old-{os.getpid()}")
        os.replace(directory, old)
    os.replace(staging, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_model(directory: Path, registries) -> tuple[TransferModel, ModelCard]:
    from safetensors.torch import load_file

    from .errors import UserError

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / MODEL_FILE).is_file():
        raise UserError(f"{directory} is not a saved autotransfer model (expected {CONFIG_FILE} and {MODEL_FILE}); "
                        "point --model at a search's best/ folder")
    card = ModelCard(**json.loads((directory / CONFIG_FILE).read_text()))
    provider = provider_for(card.backbone, registries)
    backbone = provider.create(card.backbone, WeightsRequest(pretrained=False))
    model = assemble(backbone, HeadConfig(**card.head), card.num_classes, card.frozen_stages)
    model.load_state_dict(load_file(str(directory / MODEL_FILE)))
    return model.eval(), card
