"""The backbone provider that serves `autotransfer pretrain` checkpoints (folder format: `checkpoints`).

A checkpoint is built by its architecture's own provider (timm or a plugin), then loaded with the
checkpoint's verified backbone file, or with `--weights NAME=PATH` when one is given.
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from .base import Backbone, BackboneInfo, CachedProvider, WeightsRequest, provider_for
from .checkpoints import (BACKBONE_FILE, HEAD_FILE, MANIFEST, ZOO_ENV, Manifest, is_checkpoint, locate, read_manifest,
                          verified_file, zoo_folders)
from ..errors import UserError
from .weights import load_into, read_state_dict

if TYPE_CHECKING:
    from torch import nn


class CheckpointProvider(CachedProvider):
    """Serves `autotransfer pretrain` folders as backbones, built by their architecture's provider.

    A checkpoint always brings its own weights (like `--weights`); `--no-pretrained` only turns
    off the default hub weights of plain model names.
    """

    name = "checkpoint"

    def __init__(self) -> None:
        super().__init__()
        self.registries = None

    def bind(self, registries) -> None:
        """Called by the registries: the architecture may come from any provider, plugins included."""
        self.registries = registries

    @property
    def names(self) -> tuple[str, ...]:
        found = [p.name for zoo in zoo_folders() if zoo.is_dir() for p in sorted(zoo.iterdir()) if is_checkpoint(p)]
        return tuple(found) or ("<checkpoint folder>",)

    def matches(self, model_name: str) -> bool:
        return locate(model_name) is not None

    def describe(self, model_name: str) -> BackboneInfo:
        manifest = read_manifest(self._folder(model_name))
        inner = self._architecture(manifest).describe(manifest.architecture)
        return BackboneInfo(model_name, inner.num_stages, inner.num_features, manifest.preprocessing,
                            inner.fixed_input_size)

    def _build(self, model_name: str, weights: WeightsRequest) -> Backbone:
        folder = self._folder(model_name)
        manifest = read_manifest(folder)
        architecture = self._architecture(manifest)
        template = architecture.create(manifest.architecture, WeightsRequest(pretrained=False))
        if weights.file:
            origin = weights.file
            state = read_state_dict(weights.file)
            source = f"file:{weights.file}"
        else:
            path = verified_file(folder, BACKBONE_FILE, manifest)
            origin, state, source = str(path), read_state_dict(path), f"checkpoint:{folder}"
        load_into(template.module, state, name=model_name, origin=origin)
        return Backbone(template.module, template.num_features, template.stages, manifest.preprocessing, source,
                        architecture=manifest.architecture)

    def source_classifier(self, model_name: str, weights: WeightsRequest | None = None) -> nn.Module | None:
        """The source-task head (features -> source classes), for source-label scorers."""
        from torch import nn

        folder = self._folder(model_name)
        manifest = read_manifest(folder)
        head = nn.Linear(manifest.num_features, len(manifest.source_classes))
        path = verified_file(folder, HEAD_FILE, manifest)
        load_into(head, read_state_dict(path), name=f"{model_name} source head", origin=str(path))
        return head.eval()

    def _folder(self, model_name: str) -> Path:
        folder = locate(model_name)
        if folder is None:
            raise UserError(f"{model_name!r} is not a checkpoint folder (no {MANIFEST}); run `autotransfer pretrain "
                            f"--out {model_name}` first, or list its parent folder in {ZOO_ENV}")
        return folder

    def _architecture(self, manifest: Manifest):
        if self.registries is None:
            raise RuntimeError("CheckpointProvider used before the registries bound it")
        if locate(manifest.architecture) is not None:
            raise UserError(f"checkpoint architecture {manifest.architecture!r} is itself a checkpoint; "
                            "a manifest must name a timm or plugin model")
        return provider_for(manifest.architecture, self.registries)
