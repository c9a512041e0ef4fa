"""A backbone plus a new head, with frozen stages held in eval mode; saving and loading it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backbones import Backbone, WeightsRequest, freeze, frozen_submodules, provider_for
from .backbones.checkpoints import publish_permissions
from .config import FEATURES
from .heads import HeadConfig, build_head
from .multilevel import with_stage_features

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


class TransferModel(nn.Module):
    """Images -> class logits. Frozen stages get no gradients and keep BatchNorm statistics."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self._frozen: list[nn.Module] = []
        self._kept_statistics: list[nn.Module] = []

    def freeze_stages(self, stages: list[list[str]], k: int) -> None:
        freeze(self.backbone, stages, k)
        self._frozen = frozen_submodules(self.backbone)
        self.train(self.training)

    def keep_norm_statistics(self) -> None:
        """Every BatchNorm of the backbone keeps its running statistics while training too (its affine
        weights still train). LP-FT needs this: its head was fitted to features made with those statistics,
        and batch statistics of small batches of a new domain change them completely."""
        norms = [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._kept_statistics = norms
        self.train(self.training)

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        for module in [*self._frozen, *self._kept_statistics]:
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
    val_images: int | None = None  # how many images that val accuracy was measured on (selection.py's margin)
    trial: int | None = None
    test_accuracy: float | None = None  # on the test split, scored once after the choice; None without one
    test_images: int | None = None
    features: str = "final"  # what the head reads: the final pooled features, or every stage's (multilevel.py)
    trainable_params: int | None = None  # what the trial trained: its size to selection.py
    architecture: str | None = None  # the timm/plugin name that rebuilds the module (a checkpoint backbone's
    # architecture); None: `backbone` itself. The weights are all in model.safetensors, so a copied folder loads
    # anywhere without the checkpoint folder it was trained from.

    @property
    def rebuilt_from(self) -> str:
        return self.architecture or self.backbone

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
    """Rebuild a saved model; a damaged or hand-edited folder is a one-line UserError naming what is wrong."""
    from safetensors.torch import load_file

    from .errors import UserError

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / MODEL_FILE).is_file():
        raise UserError(f"{directory} is not a saved autotransfer model (expected {CONFIG_FILE} and {MODEL_FILE}); "
                        "point --model at a search's best/ folder")
    card = read_card(directory)
    provider = provider_for(card.rebuilt_from, registries)
    backbone = provider.create(card.rebuilt_from, WeightsRequest(pretrained=False))
    try:
        if card.features == "stages":
            backbone = with_stage_features(backbone, card.image_size)
        model = assemble(backbone, HeadConfig(**card.head), card.num_classes, card.frozen_stages)
    except Exception as exc:
        raise UserError(f"{directory / CONFIG_FILE}: cannot build the model it describes (head {card.head!r}, "
                        f"frozen_stages {card.frozen_stages!r}, features {card.features!r}): {_first_line(exc)}; the card was edited or damaged: "
                        "use the folder a search wrote") from None
    try:
        state = load_file(str(directory / MODEL_FILE))
    except Exception as exc:
        raise UserError(f"{directory / MODEL_FILE} is not a readable safetensors file ({_first_line(exc)}); "
                        "it is truncated or damaged: copy the folder again") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{directory / MODEL_FILE} does not fit the model its card describes "
                        f"({card.backbone}, {card.num_classes} classes): {_first_line(exc, 2)}; the weights or "
                        f"{CONFIG_FILE} were changed: use the folder a search wrote") from None
    return model.eval(), card


def read_card(directory: Path) -> ModelCard:
    """`model.json` as a ModelCard, every field checked."""
    from .errors import UserError

    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); use the model.json a search wrote") from None
    fields = {f.name: f for f in dataclasses.fields(ModelCard)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    if not isinstance(data, dict):
        raise UserError(f"{path} holds {type(data).__name__}, not a model card object")
    missing, unknown = [k for k in required if k not in data], sorted(set(data) - set(fields))
    if missing or unknown:
        detail = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                             f"unknown {', '.join(unknown)}" if unknown else "") if part)
        raise UserError(f"{path} is not a model card this version reads ({detail}); use the model.json a search wrote")
    card = ModelCard(**data)
    for name in ("image_size", "resize_size", "decode_size"):
        value = getattr(card, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path}: {name} must be a positive integer, got {value!r}")
    if card.image_size > card.resize_size or card.resize_size > card.decode_size:
        raise UserError(f"{path}: sizes must satisfy image_size <= resize_size <= decode_size, got "
                        f"{card.image_size}, {card.resize_size}, {card.decode_size}")
    if not isinstance(card.class_names, list) or len(card.class_names) < 2 or \
            not all(isinstance(c, str) for c in card.class_names):
        raise UserError(f"{path}: class_names must be a list of at least 2 names, got {card.class_names!r}")
    if card.features not in FEATURES:
        raise UserError(f"{path}: features must be one of {', '.join(FEATURES)}, got {card.features!r}")
    if not isinstance(card.head, dict) or not isinstance(card.backbone, str):
        raise UserError(f"{path}: backbone must be a name and head an object, got {card.backbone!r}, {card.head!r}")
    if card.architecture is not None and not isinstance(card.architecture, str):
        raise UserError(f"{path}: architecture must be a model name, got {card.architecture!r}")
    for name in ("mean", "std"):
        value = getattr(card, name)
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            raise UserError(f"{path}: {name} must be 3 numbers, got {value!r}")
    return card


def _first_line(exc: Exception, lines: int = 1) -> str:
    text = " ".join(str(exc).strip().splitlines()[:lines]).strip()
    return text or type(exc).__name__
