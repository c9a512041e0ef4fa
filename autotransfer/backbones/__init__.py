"""Backbones: what a backbone is to the search, the providers that make them, weights and freezing.

- `base`: `BackboneInfo`, `WeightsRequest`, `Backbone`, the `BackboneProvider` protocol, `CachedProvider`
  and `ModuleProvider` (the bases a plugin builds on), `provider_for` (the registry lookup by name);
- `timm_provider`: every timm model name, its preprocessing from timm's `resolve_model_data_config`;
- `checkpoints` and `checkpoint_provider`: the folder format `autotransfer pretrain` writes, and the
  provider that serves such folders as backbones;
- `weights`: state dicts read from files and checkpoint folders, loaded strictly;
- `stages`: generic stage-wise freezing over timm's coarse parameter groups, stem first;
- `preprocessing`: `Preprocessing`, what a backbone was pretrained on (input size, normalisation).

Every public name is importable from here (`from autotransfer.backbones import CachedProvider`), as it
was when this was one module.
"""

from .base import (Backbone, BackboneInfo, BackboneProvider, CachedProvider, ModuleProvider, WeightsRequest,
                   provider_for, seeded, weights_label, weights_request)
from .preprocessing import Preprocessing
from .stages import freeze, frozen_submodules, timm_stages
from .timm_provider import TimmProvider
from .weights import load_into, read_state_dict

__all__ = ["Backbone", "BackboneInfo", "BackboneProvider", "CachedProvider", "ModuleProvider", "Preprocessing",
           "TimmProvider", "WeightsRequest", "freeze", "frozen_submodules", "load_into", "provider_for",
           "read_state_dict", "seeded", "timm_stages", "weights_label", "weights_request"]
