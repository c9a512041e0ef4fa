"""Generic stage-wise freezing: a backbone's coarse parameter groups (timm's
``group_matcher(coarse=True)``, stem first) are its "stages"; freezing k stages freezes the first k
groups, for any architecture that defines its groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from torch import nn


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
