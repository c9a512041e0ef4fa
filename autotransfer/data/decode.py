"""Decoding: every image read once, converted to RGB, resized and centre-cropped to a square, as uint8."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .sources import ImageRef, to_rgb  # defined with the sources (which import no torch); named here too

log = logging.getLogger(__package__)  # "autotransfer.data", as when this package was one module


# --------------------------------------------------------------------------- decoding

def decode_image(ref: ImageRef, size: int) -> torch.Tensor:
    """Decode to RGB, resize the short side to `size` and centre crop: uint8 (3, size, size)."""
    if isinstance(ref, np.ndarray):
        image = Image.fromarray(ref)
    else:
        image = Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref)
        image.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
    image = to_rgb(image)
    image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 square images (N, 3, S, S) to (N, 3, size, size), antialiased."""
    if images.shape[-1] == size:
        return images
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], 256):
        chunk = images[start:start + 256].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + 256] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def try_decode(ref: ImageRef, size: int) -> torch.Tensor | None:
    try:
        return decode_image(ref, size)
    except Image.DecompressionBombError as exc:  # skipped like any unreadable file, but say why
        log.warning("skipped %s: %s (PIL refuses images past Image.MAX_IMAGE_PIXELS = %s as a possible "
                    "decompression bomb; raise that limit only for images you trust)", describe_ref(ref),
                    str(exc).split(" could be")[0], Image.MAX_IMAGE_PIXELS)
        return None
    except Exception:  # unreadable or not an image: counted and reported once by the caller
        return None


def try_verify(ref: ImageRef) -> bool:
    """Whether a file decodes, checked cheaply (small size, JPEGs at reduced scale). `verify()` alone
    passes truncated JPEGs, which then crash a DataLoader worker mid-epoch instead of being skipped."""
    return try_decode(ref, 32) is not None


def describe_ref(ref: ImageRef) -> str:
    if isinstance(ref, (bytes, bytearray)):
        return f"<{len(ref)} encoded bytes>"
    return str(ref) if isinstance(ref, Path) else "<array>"


def native_size(refs: Sequence[ImageRef], sample: int = 64) -> int:
    """Median short side of a spread sample of the images, read from headers only."""
    step = max(1, len(refs) // sample)
    sides = []
    for ref in list(refs)[::step][:sample]:
        if isinstance(ref, np.ndarray):
            sides.append(min(ref.shape[:2]))
            continue
        try:
            with Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref) as image:
                sides.append(min(image.size))
        except Exception:
            continue
    return int(np.median(sides)) if sides else 224


def memory_budget_bytes() -> int:
    """Default cap for in-memory image caches: 40% of physical memory."""
    try:
        return int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30
