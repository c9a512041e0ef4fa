"""Augmentation and normalisation on whole batches of uint8 tensors, on the training device."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from ..devices import to_device

TRAIN_SCALE = (0.6, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


# --------------------------------------------------------------------------- transforms

def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t, std_t = _scaled_stats(tuple(mean), tuple(std), images.device)
    return (images.float() - mean_t) / std_t


@lru_cache(maxsize=64)
def _scaled_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors on `device`, made once: building them per batch from
    Python floats is a blocking host-to-device copy on CUDA."""
    with torch.inference_mode(False):  # ordinary tensors, even when first asked for under inference mode
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return to_device(mean_t, device), to_device(std_t, device)


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    offset = (images.shape[-1] - size) // 2
    return images[..., offset:offset + size, offset:offset + size]


def eval_transform(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Validation/prediction: centre crop then normalise (the resize happened at decode)."""
    return normalise(centre_crop(images, size), mean, std)


def train_transform(images: torch.Tensor, size: int, mean, std, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random resized crop (mild scale) + horizontal flip for a whole batch, as one grid sample."""
    n = images.shape[0]
    rand = to_device(torch.rand((n, 5), generator=generator), images.device)  # CPU draws: same on any device
    scale = TRAIN_SCALE[0] + (TRAIN_SCALE[1] - TRAIN_SCALE[0]) * rand[:, 0]
    log_ratio = math.log(TRAIN_RATIO[0]) + (math.log(TRAIN_RATIO[1]) - math.log(TRAIN_RATIO[0])) * rand[:, 1]
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(scale * ratio).clamp(max=1.0)
    height = torch.sqrt(scale / ratio).clamp(max=1.0)
    centre_x = (1 - width) * (2 * rand[:, 2] - 1)
    centre_y = (1 - height) * (2 * rand[:, 3] - 1)
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros((n, 2, 3), device=images.device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    sampled = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return normalise(sampled, mean, std)
