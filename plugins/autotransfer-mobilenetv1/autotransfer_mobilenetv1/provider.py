"""Two ImageNet-pretrained MobileNetV1-0.25 backbones, weights read from a local folder.

The folder comes only from the environment variable ``AUTOTRANSFER_MOBILENETV1_WEIGHTS``; every
file is checked against its published sha256 before it is loaded. The module is timm's MobileNetV1
generator (``timm.models.efficientnet._gen_mobilenet_v1``) at width 0.25, so timm's coarse groups
(stem, blocks 0-4) are the stages that can be frozen.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING

from autotransfer.backbones import (
    Backbone,
    BackboneInfo,
    CachedProvider,
    Preprocessing,
    WeightsRequest,
    load_into,
    read_state_dict,
    timm_stages,
)
from autotransfer.errors import UserError, WeightsUnavailable

if TYPE_CHECKING:  # torch loads when a backbone is built, not when the plugin registers
    import torch
    from torch import nn

ENV_VAR = "AUTOTRANSFER_MOBILENETV1_WEIGHTS"
WIDTH = 0.25
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_PREFIX = "classifier."
NUM_SOURCE_CLASSES = 1000


@dataclass(frozen=True)
class Spec:
    """One served backbone: its weight file, architecture switches and preprocessing."""

    file: str
    sha256: str
    act: str  # "leaky_relu_0.1" or "relu6"
    pad_type: str
    bn_eps: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_classifier: bool
    input_size: int = 224
    crop_pct: float = 0.875


SPECS: dict[str, Spec] = {
    "mobilenetv1_025_leaky_in1k": Spec(
        file="mobilenetv1_025_leaky_in1k.safetensors",
        sha256="e464bd4b1d07b83a5c8fde2ca464877a16d12a8249090fe58aea3337e7bdd7d3",
        act="leaky_relu_0.1", pad_type="", bn_eps=1e-5,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, has_classifier=True),
    "mobilenetv1_025_keras_in1k": Spec(
        file="mobilenetv1_025_keras_in1k_notop.safetensors",
        sha256="da94e4f8d5c914b8a4c482c8906c23ce1f73d4831a0966653e797785f10abe6b",
        act="relu6", pad_type="same", bn_eps=1e-3,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), has_classifier=False),
}
NAMES = tuple(SPECS)


def _spec(model_name: str) -> Spec:
    try:
        return SPECS[model_name]
    except KeyError:
        raise UserError(f"backbone {model_name!r} is not served by autotransfer-mobilenetv1; "
                        f"it serves {', '.join(NAMES)}") from None


# --------------------------------------------------------------------------- module

def build_module(model_name: str, num_classes: int = 0) -> nn.Module:
    """The architecture of `model_name`, randomly initialised (pooled features when num_classes=0)."""
    from torch import nn

    spec = _spec(model_name)
    try:
        from timm.models.efficientnet import _gen_mobilenet_v1
    except ImportError:
        import timm

        raise UserError(f"backbone {model_name!r} needs timm's MobileNetV1 generator, which timm {timm.__version__} "
                        "lacks; upgrade timm (pip install -U timm)") from None
    act = partial(nn.LeakyReLU, negative_slope=0.1) if spec.act == "leaky_relu_0.1" else nn.ReLU6
    pretrained_cfg = dict(  # what the weights were trained with; also stops timm warning about a missing cfg
        architecture=model_name, input_size=(3, spec.input_size, spec.input_size), crop_pct=spec.crop_pct,
        mean=spec.mean, std=spec.std, num_classes=NUM_SOURCE_CLASSES if spec.has_classifier else 0,
        first_conv="conv_stem", classifier="classifier")
    return _gen_mobilenet_v1(model_name, WIDTH, act_layer=act, pad_type=spec.pad_type, bn_eps=spec.bn_eps,
                             num_classes=num_classes, pretrained_cfg=pretrained_cfg)


@lru_cache(maxsize=None)
def describe(model_name: str) -> BackboneInfo:
    """Stages and feature width from a module built on the meta device: no memory, no weights."""
    import torch

    spec = _spec(model_name)
    with torch.device("meta"):
        module = build_module(model_name)
    preprocessing = Preprocessing(spec.input_size, spec.mean, spec.std, spec.crop_pct)
    return BackboneInfo(model_name, len(timm_stages(module)), int(module.num_features), preprocessing)


# --------------------------------------------------------------------------- weights

def _fix() -> str:
    return (f"set {ENV_VAR} to the folder holding the published MobileNetV1 weight files, "
            "or pass --weights NAME=PATH, or --no-pretrained for random init")


def weights_path(model_name: str) -> Path:
    """The file of `model_name` in the folder named by AUTOTRANSFER_MOBILENETV1_WEIGHTS."""
    spec = _spec(model_name)
    folder = os.environ.get(ENV_VAR, "").strip()
    if not folder:
        raise WeightsUnavailable(f"pretrained weights for {model_name!r} are unavailable: {ENV_VAR} is not set; "
                                 f"{_fix()}")
    path = Path(folder).expanduser() / spec.file
    if not path.is_file():
        raise WeightsUnavailable(f"pretrained weights for {model_name!r} are unavailable: {path} does not exist "
                                 f"({ENV_VAR}={folder}); {_fix()}")
    return path


def _read_verified(model_name: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of `model_name` from the weights folder, after its sha256 is checked."""
    from safetensors.torch import load as load_bytes

    spec = _spec(model_name)
    path = weights_path(model_name)
    data = path.read_bytes()  # hash and parse the same bytes
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise WeightsUnavailable(f"pretrained weights for {model_name!r} are unavailable: {path} has sha256 "
                                 f"{digest}, expected {spec.sha256} (corrupt or another file); replace it with "
                                 f"the published {spec.file}, or point {ENV_VAR} at a folder that has it")
    try:
        return load_bytes(data), path
    except Exception as exc:
        raise WeightsUnavailable(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from None


def _read_user_file(model_name: str, file: str) -> dict[str, torch.Tensor]:
    """A --weights file: any state dict that fits, but not the other served backbone's published file."""
    digest = hashlib.sha256(Path(file).read_bytes()).hexdigest() if Path(file).is_file() else None
    for other, spec in SPECS.items():
        if other != model_name and digest == spec.sha256:
            raise WeightsUnavailable(f"weights file {file} is the published {spec.file} of {other!r}, not of "
                                     f"{model_name!r} (other activation/padding); pass it as --weights {other}=PATH")
    return read_state_dict(file)


def load_state(model_name: str, weights: WeightsRequest) -> tuple[dict[str, torch.Tensor], str]:
    """The full state dict (classifier included when the file has one) and its source label."""
    if weights.file:
        return _read_user_file(model_name, weights.file), f"file:{weights.file}"
    state, path = _read_verified(model_name)
    return state, f"file:{path}"


# --------------------------------------------------------------------------- provider

class MobileNetV1Provider(CachedProvider):
    """Serves exactly the names in SPECS; a deep copy of a per-(name, request) template each time."""

    name = "mobilenetv1"
    names = NAMES

    def matches(self, model_name: str) -> bool:
        return model_name in SPECS

    def describe(self, model_name: str) -> BackboneInfo:
        return describe(model_name)

    def _build(self, model_name: str, weights: WeightsRequest) -> Backbone:
        info = describe(model_name)
        module = build_module(model_name, num_classes=0)
        if weights.file or weights.pretrained:
            state, source = load_state(model_name, weights)
            load_into(module, state, name=model_name, origin=source.removeprefix("file:"),
                      ignore_prefixes=(CLASSIFIER_PREFIX,))
        else:
            source = "random init"
        module.eval()
        return Backbone(module, info.num_features, timm_stages(module), info.preprocessing, source)

    def source_classifier(self, model_name: str, weights: WeightsRequest | None = None) -> nn.Linear | None:
        return source_classifier(model_name, weights)


def source_classifier(model_name: str, weights: WeightsRequest | None = None) -> nn.Linear | None:
    """The backbone's own ImageNet head (features -> 1000 logits) for source-label scores such as
    LEEP/NCE; None when the published file has no head (the keras one).

    Reads the verified file from AUTOTRANSFER_MOBILENETV1_WEIGHTS, or `weights.file` when given.
    """
    spec = _spec(model_name)
    if not spec.has_classifier:
        return None
    state, source = load_state(model_name, weights or WeightsRequest(pretrained=True))
    head_state = {k.removeprefix(CLASSIFIER_PREFIX): v for k, v in state.items() if k.startswith(CLASSIFIER_PREFIX)}
    from torch import nn

    head = nn.Linear(describe(model_name).num_features, NUM_SOURCE_CLASSES)
    load_into(head, head_state, name=f"{model_name} classifier", origin=source.removeprefix("file:"))
    return head.eval()
