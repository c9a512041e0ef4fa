"""Backbones: timm creation, weight resolution and generic stage-wise freezing.

A backbone maps images to pooled features. Its coarse parameter groups (timm's
``group_matcher(coarse=True)``, stem first) are its "stages": freezing k stages freezes the
first k groups, for any architecture that defines its groups.
"""

from __future__ import annotations

import copy
import os
import pickle
import threading
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import RANDOM_WEIGHTS, SearchConfig
from .errors import UserError, WeightsUnavailable
from .preprocessing import Preprocessing  # defined apart so checkpoints need not import this module


@dataclass(frozen=True)
class BackboneInfo:
    """Cheap facts about a backbone, known before any weights are loaded."""

    name: str
    num_stages: int
    num_features: int
    preprocessing: Preprocessing
    fixed_input_size: bool = False  # only the pretrained input size works (e.g. Swin)


@dataclass(frozen=True)
class WeightsRequest:
    """Where the weights should come from: a local file, the pretrained default, or random init.

    `init_seed` fixes the random init (of the whole module, before any file or hub weights are
    loaded over it): the same request gives the same parameters in any process, whatever ran before.
    """

    pretrained: bool
    file: str | None = None
    init_seed: int = 0

    @property
    def label(self) -> str:
        return "file" if self.file else ("pretrained" if self.pretrained else "random init")


@dataclass
class Backbone:
    module: nn.Module  # images -> pooled features (N, num_features)
    num_features: int
    stages: list[list[str]]  # parameter names per coarse stage, stem first
    preprocessing: Preprocessing
    source: str  # where the weights came from, for the leaderboard and the saved model


# --------------------------------------------------------------------------- weights

def _ways_out(name: str) -> str:
    return (f"ways out: --weights {name}=PATH to a local .safetensors/.pth state dict; "
            "fill the Hugging Face cache (run once with network, or point HF_HOME at a populated cache); "
            "or --no-pretrained to train from random init")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth state dict, unwrapping the usual checkpoint envelopes."""
    file = Path(path)
    if file.is_dir():
        from .checkpoints import is_checkpoint, weights_in_folder

        if not is_checkpoint(file):
            raise WeightsUnavailable(f"weights path {file} is a folder but not an `autotransfer pretrain` checkpoint "
                                     "(no manifest.json); give a .safetensors/.pth file or a checkpoint folder")
        file = weights_in_folder(file)
    if not file.is_file():
        raise WeightsUnavailable(f"weights file {file} does not exist; fix the PATH in --weights NAME=PATH")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsUnavailable(f"weights file {file} holds pickled Python objects, not just tensors, and pickles "
                                 "are refused (they can run code); save a state dict of tensors "
                                 "(torch.save(model.state_dict(), path)) or a .safetensors file") from None
    except Exception as exc:
        detail = " ".join(str(exc).strip().splitlines()[:1]) or type(exc).__name__
        raise WeightsUnavailable(f"cannot read weights file {file}: {type(exc).__name__}: {detail}") from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailable(f"weights file {file} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], *, name: str, origin: str,
              ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load `state` into `module`, every backbone tensor required; classifier keys may be ignored."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else state
    expected = module.state_dict()
    # One-element tensors saved as (1,) for a 0-dim buffer (num_batches_tracked) fit, as in torch.
    state = {k: v.reshape(expected[k].shape) if k in expected and v.numel() == 1 == expected[k].numel() else v
             for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
    if problems:
        raise WeightsUnavailable(f"weights from {origin} do not fit backbone {name!r}: tensors {'; '.join(problems)}; "
                                 "check that the file belongs to this architecture")
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- stages

def timm_stages(model: nn.Module) -> list[list[str]]:
    """timm's coarse parameter groups, stem first; every parameter lands in exactly one."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise UserError(f"{type(model).__name__} defines no group_matcher(); it cannot be frozen stage-wise")
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [list(groups[key]) for key in sorted(groups)]


def freeze(module: nn.Module, stages: list[list[str]], k: int) -> None:
    """Freeze the first `k` stages (no gradients); the rest train."""
    if not 0 <= k <= len(stages):
        raise ValueError(f"frozen_stages must be in 0..{len(stages)}, got {k}")
    frozen = {name for stage in stages[:k] for name in stage}
    for name, param in module.named_parameters():
        param.requires_grad_(name not in frozen)


def frozen_submodules(module: nn.Module) -> list[nn.Module]:
    """The largest submodules whose parameters are all frozen: they must stay in eval mode."""
    found: list[nn.Module] = []

    def visit(mod: nn.Module) -> None:
        params = list(mod.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append(mod)
            return
        for child in mod.children():
            visit(child)

    visit(module)
    return found


# --------------------------------------------------------------------------- timm provider

class CachedProvider:
    """Base for providers: `_build` once per (name, weights), then hand out deep copies.

    Trials must not share parameters, and re-reading weights for every trial is wasted I/O.
    `_build` runs with torch's global RNG seeded from `weights.init_seed` (and restored after), so
    a random-init template depends on the request alone, not on what the process drew before.
    """

    def __init__(self) -> None:
        self._templates: dict[tuple[str, WeightsRequest], Backbone] = {}
        self._lock = threading.Lock()

    def create(self, model_name: str, weights: WeightsRequest) -> Backbone:
        key = (model_name, weights)
        with self._lock:
            if key not in self._templates:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(weights.init_seed)
                    self._templates[key] = self._build(model_name, weights)
        template = self._templates[key]
        return Backbone(copy.deepcopy(template.module), template.num_features,
                        template.stages, template.preprocessing, template.source)

    def _build(self, model_name: str, weights: WeightsRequest) -> Backbone:
        raise NotImplementedError


class ModuleProvider(CachedProvider):
    """Serves one name from a module factory: the shortest way for a plugin to add a backbone it
    builds itself. The module has `num_features` and a timm-style `group_matcher`; it starts from
    random init (seeded, so trials share it), or from `--weights NAME=FILE`."""

    def __init__(self, model_name: str, factory: Callable[[], nn.Module], preprocessing: Preprocessing):
        super().__init__()
        self.name, self.names = model_name, (model_name,)
        self.factory, self.preprocessing = factory, preprocessing

    def matches(self, model_name: str) -> bool:
        return model_name == self.name

    def describe(self, model_name: str) -> BackboneInfo:
        backbone = self.create(model_name, WeightsRequest(pretrained=False))
        return BackboneInfo(model_name, len(backbone.stages), backbone.num_features, self.preprocessing)

    def _build(self, model_name: str, weights: WeightsRequest) -> Backbone:
        module = self.factory()
        source = "random init"
        if weights.file:
            load_into(module, read_state_dict(weights.file), name=model_name, origin=weights.file)
            source = f"file:{weights.file}"
        return Backbone(module, int(module.num_features), timm_stages(module), self.preprocessing, source)


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

    cfg = _pretrained_cfg(model_name)
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **dict(_create_kwargs(model_name)))
    patch_embed = getattr(model, "patch_embed", None)
    cfg = {**cfg, **getattr(model, "pretrained_cfg", {})}
    preprocessing = Preprocessing(
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )
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
                                 f"timm knows no pretrained weights for this name; {_ways_out(model_name)}")
    import timm

    try:
        # Create with the checkpoint's own class count so timm loads strictly (with num_classes=0
        # it would load non-strictly and leave missing tensors random), then drop the classifier.
        module = timm.create_model(model_name, pretrained=True, num_classes=cfg.get("num_classes", 1000),
                                   **dict(_create_kwargs(model_name)))
        if not keep_classifier:
            module.reset_classifier(0)
        return module
    except Exception as exc:
        raise WeightsUnavailable(f"pretrained weights for {model_name!r} are unavailable: "
                                 f"{_hub_failure_reason(cfg, exc)}; {_ways_out(model_name)}") from None


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


# --------------------------------------------------------------------------- lookup

def provider_for(model_name: str, registries) -> object:
    """The registered provider serving `model_name`, or a UserError that suggests near names."""
    provider = registries.backbone_provider(model_name)
    if provider is not None:
        return provider
    import difflib

    import timm

    arch = model_name.split(".")[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.75)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown backbone {model_name!r}{hint}; use a timm model name or one served by a plugin "
                    "(see `autotransfer plugins`)")


def weights_label(request: WeightsRequest, source: str) -> str:
    """The leaderboard's `pretrained` column: what the trial actually started from."""
    if request.file:
        return "file"
    if source == "random init" or source.startswith("checkpoint:"):
        return source.split(":", 1)[0]
    return "pretrained"  # hub weights, or a plugin's own pretrained weights (wherever it keeps them)


def weights_request(config: SearchConfig, backbone: str) -> WeightsRequest:
    """--weights NAME=PATH, --weights NAME=random, else the default weights unless --no-pretrained."""
    file = config.weights.get(backbone)
    if file == RANDOM_WEIGHTS:
        return seeded(WeightsRequest(pretrained=False), config.seed)
    return seeded(WeightsRequest(pretrained=config.pretrained, file=file), config.seed)


def seeded(request: WeightsRequest, seed: int) -> WeightsRequest:
    """`request` with its random init fixed by `seed`; loaded weights do not depend on it, so
    those requests keep `init_seed` 0 (one template per file, whatever the seed)."""
    return request if request.file or request.pretrained else replace(request, init_seed=seed)
