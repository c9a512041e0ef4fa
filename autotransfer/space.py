"""The search space, define-by-run: each dimension is an Optuna suggestion a flag can restrict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import optuna

from .config import SearchConfig, parse_frozen_spec, resolve_stage
from .heads import HeadConfig


@dataclass(frozen=True)
class TrialParams:
    backbone: str
    frozen_stages: int
    num_stages: int
    head: HeadConfig
    lr: float
    optimizer: str


def suggest(trial: optuna.Trial, config: SearchConfig, num_stages: Callable[[str], int],
            backbones: list[str] | None = None) -> TrialParams:
    """Sample one configuration; `num_stages(backbone)` bounds how deep it may be frozen, and
    `backbones` (the pre-ranked top k) may narrow the candidates."""
    backbone = trial.suggest_categorical("backbone", backbones or config.backbones)
    stages = num_stages(backbone)
    mode, tokens = parse_frozen_spec(config.frozen_stages)
    if mode == "range":
        high = resolve_stage(tokens[1], stages)
        low = min(resolve_stage(tokens[0], stages), high)
        frozen = trial.suggest_int("frozen_stages", low, high)
    else:
        frozen = resolve_stage(trial.suggest_categorical("frozen_stages", tokens), stages)
    kind = trial.suggest_categorical("head", config.heads)
    head = HeadConfig(kind)
    if kind == "mlp":
        hidden = trial.suggest_categorical("head_hidden", config.head_hidden)
        head = HeadConfig(kind, hidden, _suggest_float(trial, "head_dropout", config.head_dropout))
    lr = _suggest_float(trial, "lr", config.lr, log=True)
    optimizer = trial.suggest_categorical("optimizer", config.optimizers)
    return TrialParams(backbone, frozen, stages, head, lr, optimizer)


def _suggest_float(trial: optuna.Trial, name: str, bounds: tuple[float, float], log: bool = False) -> float:
    low, high = bounds
    if low == high:  # a dimension pinned by a flag is still recorded, as a fixed value
        trial.set_user_attr(name, low)
        return low
    return trial.suggest_float(name, low, high, log=log)


def first_trial(config: SearchConfig, backbone: str, stages: int) -> dict:
    """A sensible opening trial for a backbone, inside the configured space: train the last stage
    and a linear head with Adam at 1e-3 (the nearest allowed values where the space says otherwise)."""
    params: dict = {"backbone": backbone}
    mode, tokens = parse_frozen_spec(config.frozen_stages)
    target = max(stages - 1, 0)
    if mode == "range":
        high = resolve_stage(tokens[1], stages)
        low = min(resolve_stage(tokens[0], stages), high)
        params["frozen_stages"] = min(max(target, low), high)
    else:
        params["frozen_stages"] = min(tokens, key=lambda t: abs(resolve_stage(t, stages) - target))
    params["head"] = "linear" if "linear" in config.heads else config.heads[0]
    if params["head"] == "mlp":
        params["head_hidden"] = config.head_hidden[0]
        if config.head_dropout[0] != config.head_dropout[1]:
            params["head_dropout"] = config.head_dropout[0]
    low, high = config.lr
    if low != high:
        params["lr"] = min(max(1e-3, low), high)
    params["optimizer"] = "adam" if "adam" in config.optimizers else config.optimizers[0]
    return params
