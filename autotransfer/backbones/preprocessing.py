"""What a backbone was pretrained on (input size, normalisation, crop), carried with its weights.

Its own module so that both the backbone providers and the checkpoint format can use it without
importing each other; `autotransfer.backbones.Preprocessing` is the same class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocessing:
    """What the backbone was pretrained on: input size and normalisation."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
