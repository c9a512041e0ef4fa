"""The built-in provider of every timm model name: creation, its pretrained configuration
(`timm.data.resolve_model_data_config`, so no caller restates timm's defaults), and hub weights
(or the local Hugging Face cache when offline), never a silent random init."""

from __future__ import annotations

import copy
import os
from functools import lru_cache

from typing import TYPE_CHECKING

from ..errors import UserError, WeightsUnavailable
from .base import Backbone, BackboneInfo, CachedProvider, WeightsRequest
from .hub import availability
from .preprocessing import Preprocessing
from .stages import timm_stages
from .weights import load_into, read_state_dict, ways_out

if TYPE_CHECKING:
    from torch import nn


class TimmProvider(CachedProvider):
    """Every timm model name, with or without a pretrained tag."""

    name = "timm"

    def matches(self, model_name: str) -> bool:
        import timm

        return timm.is_model(model_name)

    def describe(self, model_name: str) -> BackboneInfo:
        return _describe_timm(model_name)

    def _build(self, model_name: str, weights: WeightsRequest) -> Backbone:
        info = self.describe(model_name)
        cfg = _pretrained_cfg(model_name)
        if weights.file:
            module = _create_timm(model_name)
            classifiers = cfg.get("classifier") or ()
            classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
            load_into(module, read_state_dict(weights.file), name=model_name, origin=weights.file,
                      ignore_prefixes=tuple(f"{c}." for c in classifiers))
            source = f"file:{weights.file}"
        elif weights.pretrained:
            module = _load_from_hub(model_name, cfg)
            source = f"hf-hub:{cfg.get('hf_hub_id') or cfg.get('url')}"
        else:
            module = _create_timm(model_name)
            source = "random init"
        return Backbone(module, info.num_features, timm_stages(module), info.preprocessing, source)


    def source_classifier(self, model_name: str, weights: WeightsRequest | None = None) -> nn.Module | None:
        """The pretrained classifier (pooled features -> source logits) for LEEP/NCE; None for random
        init or a --weights file (whose head, if any, is not known to match the source classes)."""
        weights = weights or WeightsRequest(pretrained=True)
        if weights.file or not weights.pretrained:
            return None
        module = _load_from_hub(model_name, _pretrained_cfg(model_name), keep_classifier=True)
        head = module.get_classifier()
        from torch import nn

        if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
            return None
        return copy.deepcopy(head).eval()


def _pretrained_cfg(model_name: str) -> dict:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError as exc:  # an unknown tag
        arch = model_name.split(".")[0]
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise UserError(f"backbone {model_name!r}: {exc} Known tags: {', '.join(tags) or 'none'}") from None
    return cfg.to_dict() if cfg is not None else {}


@lru_cache(maxsize=None)
def _create_kwargs(model_name: str) -> tuple[tuple[str, bool], ...]:
    """ViTs with a fixed patch grid get `dynamic_img_size` so any crop size works."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    if getattr(getattr(model, "patch_embed", None), "strict_img_size", False):
        try:
            with torch.device("meta"):
                timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True)
            return (("dynamic_img_size", True),)
        except TypeError:
            return ()
    return ()


def _create_timm(model_name: str, pretrained: bool = False) -> nn.Module:
    import timm

    return timm.create_model(model_name, pretrained=pretrained, num_classes=0, **dict(_create_kwargs(model_name)))


@lru_cache(maxsize=None)
def _describe_timm(model_name: str) -> BackboneInfo:
    import timm
    import timm.data
    import torch

    cfg = _pretrained_cfg(model_name)
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **dict(_create_kwargs(model_name)))
    patch_embed = getattr(model, "patch_embed", None)
    cfg = {**cfg, **getattr(model, "pretrained_cfg", {})}
    data = timm.data.resolve_model_data_config(model)  # timm's own defaults where the weights say nothing
    preprocessing = Preprocessing(input_size=int(data["input_size"][-1]), mean=tuple(float(v) for v in data["mean"]),
                                  std=tuple(float(v) for v in data["std"]), crop_pct=float(data["crop_pct"]))
    # timm marks every ViT fixed-size; with dynamic_img_size the module itself says otherwise.
    if patch_embed is not None and hasattr(patch_embed, "strict_img_size"):
        fixed = bool(patch_embed.strict_img_size)
    else:
        fixed = bool(cfg.get("fixed_input_size", False))
    # Models with a pre-logits conv (MobileNetV3) pool to head_hidden_size, not num_features.
    features = getattr(model, "head_hidden_size", None) or model.num_features
    return BackboneInfo(model_name, len(timm_stages(model)), int(features), preprocessing, fixed)


def _load_from_hub(model_name: str, cfg: dict, keep_classifier: bool = False) -> nn.Module:
    """Pretrained weights through timm (hub, or the local HF cache when offline); never random."""
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise WeightsUnavailable(f"pretrained weights for {model_name!r} are unavailable: "
                                 f"timm knows no pretrained weights for this name; {ways_out(model_name)}")
    import timm

    found = availability(cfg)  # the caches, then one quick request: never huggingface_hub's retries
    if found.missing:
        raise WeightsUnavailable(f"pretrained weights for {model_name!r} are unavailable: {found.missing}; "
                                 f"{ways_out(model_name)}")
    overlay = {"pretrained_cfg_overlay": {"file": found.local}} if found.local else {}
    try:
        # Create with the checkpoint's own class count so timm loads strictly (with num_classes=0
        # it would load non-strictly and leave missing tensors random), then drop the classifier.
        module = timm.create_model(model_name, pretrained=True, num_classes=cfg.get("num_classes", 1000),
                                   **overlay, **dict(_create_kwargs(model_name)))
        if not keep_classifier:
            module.reset_classifier(0)
        return module
    except Exception as exc:
        raise WeightsUnavailable(f"pretrained weights for {model_name!r} are unavailable: "
                                 f"{_hub_failure_reason(cfg, exc)}; {ways_out(model_name)}") from None


def _hub_failure_reason(cfg: dict, exc: Exception) -> str:
    from huggingface_hub import constants

    repo = cfg.get("hf_hub_id") or cfg.get("url")
    text = " ".join(str(exc).split())
    if "loading state_dict" in text:
        return f"the checkpoint of {repo} does not fit the model ({text[:300]})"
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        return f"HF_HUB_OFFLINE is set and {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    return f"downloading {repo} failed (offline or blocked?): {type(exc).__name__}: {text[:300]}"
