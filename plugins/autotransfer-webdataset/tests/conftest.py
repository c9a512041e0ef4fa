"""Fixtures: a synthetic image folder with train/val splits, and the same images as shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from wds_helpers import FOLDER_IMAGES, jpeg_bytes, png_bytes, smooth_image


@pytest.fixture
def image_folder(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """An ImageFolder with train/val splits, 3 classes; returns its root and the pixels of each file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    pixels = {}
    for cls, split, name, shape in FOLDER_IMAGES:
        array = smooth_image(rng, shape)
        path = root / split / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(array) if name.endswith(".png") else jpeg_bytes(array))
        pixels[f"{split}/{cls}/{name}"] = array
    return root, pixels


@pytest.fixture
def shard_folder(image_folder, tmp_path) -> Path:
    """The image folder as shards of 2 samples: classes.txt, train-00000{0,1,2}.tar, val-00000{0,1,2}.tar."""
    from autotransfer_webdataset import write_shards

    out = tmp_path / "shards"
    write_shards(image_folder[0], out, samples_per_shard=2, shuffle=False)
    return out
