"""Classification heads put on top of a backbone's pooled features."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class HeadConfig:
    kind: str  # "linear" or "mlp"
    hidden: int | None = None
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def build_head(config: HeadConfig, in_features: int, num_classes: int) -> nn.Module:
    if config.kind == "linear":
        return nn.Linear(in_features, num_classes)
    if config.kind == "mlp":
        if not config.hidden:
            raise ValueError("an mlp head needs a hidden width")
        return nn.Sequential(
            nn.Linear(in_features, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, num_classes),
        )
    raise ValueError(f"unknown head kind {config.kind!r}; choose linear or mlp")
