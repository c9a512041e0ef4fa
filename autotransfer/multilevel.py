"""Features from every stage: the pooled output of each coarse stage, concatenated with the final
pooled features, for a fully frozen trial's head.

The last stage of an ImageNet backbone is the most specific to ImageNet; a target far from it
(digits, textures, small images) is often better served by the earlier, more generic stages
(Evci et al., ICML 2022, "Head2Toe"). A probe on the concatenation costs one more extraction
and a wider logistic regression; the search keeps it only where val says it is better.

Invariants: the stages are the same coarse parameter groups freezing counts (stem first). A stage
contributes the output of the smallest module that holds all of its parameters; a stage that has
no such proper submodule (a stem or head spread over the root) and the last stage (whose output
the final features already pool) contribute nothing. Outputs are pooled by their layout: a 4-D
output is taken as NCHW and averaged over H and W, a 3-D one as (N, tokens, C) and averaged over
the tokens; any other output stops the model from offering stage features (`NoStageFeatures`).
The wrapper holds the backbone as `module`, so its state differs from the plain backbone's by
that prefix: caches keyed by the weights' digest never mix the two feature kinds.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import Backbone



class NoStageFeatures(Exception):
    """This backbone's stages cannot be pooled; the message says why."""


def stage_modules(module: nn.Module, stages: list[list[str]]) -> list[str]:
    """The module names whose outputs are pooled, in stage order (see the module docstring)."""
    names = []
    for params in stages[:-1]:
        owners = [name.rsplit(".", 1)[0] if "." in name else "" for name in params]
        parts = [owner.split(".") if owner else [] for owner in owners]
        common: list[str] = []
        for column in zip(*parts):
            if len(set(column)) != 1:
                break
            common.append(column[0])
        if common:
            names.append(".".join(common))
    return names


def _pool(output) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise NoStageFeatures(f"a stage returns {type(output).__name__}, not a tensor")
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    if output.ndim == 3:
        return output.mean(dim=1)
    raise NoStageFeatures(f"a stage returns a {output.ndim}-D tensor; only 3-D and 4-D outputs are pooled")


class StagePooled(nn.Module):
    """Images -> [pooled output of each named stage module ..., the backbone's pooled features]."""

    def __init__(self, module: nn.Module, names: list[str], final_width: int):
        super().__init__()
        self.module = module
        self.names = list(names)
        self.final_width = final_width  # the last `final_width` columns are the backbone's own features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled: list[torch.Tensor] = []
        handles = [self.module.get_submodule(name).register_forward_hook(
            lambda _module, _inputs, output: pooled.append(_pool(output).flatten(1))) for name in self.names]
        try:
            final = self.module(images)
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat([*pooled, final.flatten(1)], dim=1)


def with_stage_features(backbone: Backbone, image_size: int) -> Backbone:
    """`backbone` whose module returns the stage features; `image_size` sizes the one dry run that
    measures their width. Raises `NoStageFeatures` when no stage can be pooled."""
    names = stage_modules(backbone.module, backbone.stages)
    if not names:
        raise NoStageFeatures("no stage but the last has a module of its own")
    wrapped = StagePooled(backbone.module, names, backbone.num_features)
    training = wrapped.training
    wrapped.eval()
    try:
        with torch.no_grad():
            width = wrapped(torch.zeros(1, 3, image_size, image_size)).shape[1]
    finally:
        wrapped.train(training)
    stages = [[f"module.{name}" for name in stage] for stage in backbone.stages]
    return Backbone(wrapped, int(width), stages, backbone.preprocessing, backbone.source, backbone.architecture)
