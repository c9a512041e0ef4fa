"""Test helpers: synthetic images and hand-written tar shards (a unique module name, unlike conftest)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "owl")
# (class, split, file name, (height, width)); a PNG and a JPEG per class and split, all sizes different
FOLDER_IMAGES = [
    (cls, split, f"{cls}{i}.{ext}", (12 + 3 * c + i + (5 if split == "val" else 0), 20 + 2 * c - i))
    for c, cls in enumerate(CLASSES) for split in ("train", "val") for i, ext in enumerate(("png", "jpg"))
]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image).copy()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A tar with exactly these members, in this order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def smooth_image(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A colour gradient plus a little noise: JPEG keeps it close, PNG keeps it exact."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    colour = rng.integers(40, 200, 3)
    slope = rng.uniform(-3, 3, (2, 3))
    image = colour + rows[..., None] * slope[0] + cols[..., None] * slope[1] + rng.normal(0, 2, (*shape, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def tiny_png(value: int = 0, size: int = 4) -> bytes:
    return png_bytes(np.full((size, size, 3), value, dtype=np.uint8))
