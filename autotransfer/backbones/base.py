"""What a backbone is to the search: its facts (`BackboneInfo`), the weights asked for (`WeightsRequest`),
the module handed to a trial (`Backbone`), and the `BackboneProvider` protocol every provider follows
(built-in or a plugin's; docs/plugins.md is the contract), with `CachedProvider`, the base that builds
each (name, weights) once and hands each trial a copy.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

from ..config import RANDOM_WEIGHTS
from ..errors import UserError
from .preprocessing import Preprocessing
from .stages import timm_stages
from .weights import load_into, read_state_dict

if TYPE_CHECKING:
    from torch import nn

    from ..config import SearchConfig


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
    architecture: str | None = None  # the model name that builds this module when it differs from the
    # backbone's name (a `pretrain` checkpoint's manifest architecture): what a saved model rebuilds from


@runtime_checkable
class BackboneProvider(Protocol):
    """What the search asks of a backbone provider (`autotransfer_backbone_providers`). Optional:
    `names` (the names it serves, for the listing) and `source_classifier(model_name, weights=None)`
    (the pretrained head, for source-label scorers)."""

    name: str

    def matches(self, model_name: str) -> bool:
        """Whether this provider serves `model_name` (cheap: look at the name)."""

    def describe(self, model_name: str) -> BackboneInfo:
        """Stages, feature width and preprocessing, without reading weights."""

    def create(self, model_name: str, weights: WeightsRequest) -> Backbone:
        """A module with fresh parameters (one per trial), weights as `weights` asks, or WeightsUnavailable."""


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
        import torch

        key = (model_name, weights)
        with self._lock:
            if key not in self._templates:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(weights.init_seed)
                    self._templates[key] = self._build(model_name, weights)
        template = self._templates[key]
        return replace(template, module=copy.deepcopy(template.module))

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


def provider_for(model_name: str, registries) -> BackboneProvider:
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
