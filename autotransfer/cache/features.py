"""Pooled features of a backbone over a dataset: one forward pass, no augmentation, cached on disk.

The cache key is a fingerprint of everything the features depend on: the backbone's weights (a
hash of its tensors, so a changed file or checkpoint never hits a stale entry), the images (a
hash of the decoded pixels), and the preprocessing (crop, resize, mean, std). Scores, rankings,
fully frozen search trials and later searches on the same data reuse an entry instead of running
the backbone again. Source-classifier probabilities are not cached: they are computed from the
cached features (a cheap linear layer), so one entry serves callers with or without a source head.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import ImageSet, eval_transform
from ..devices import autocast_for, eval_batch, memory_format, wants_channels_last
from ..trainer import TrialInputs

FEATURES_DIR = "features"  # the cache's folder under a run's --out (or rank's)
CACHE_VERSION = 2  # 2: the key no longer covers the source head


@dataclass
class FeatureSet:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    source_probs: np.ndarray | None  # (N, C_source) or None without a source head
    seconds: float  # time the forward pass took when it ran (also for entries read from the cache)
    cached: bool  # read from the cache in this call


def tensors_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names, shapes, dtypes, values): the identity of its weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def images_digest(images: ImageSet) -> str:
    """The decoded pixels when in memory (named by their data cache key when they come from one, which
    hashes every file's path, size and mtime); for streamed sets, each file's identity."""
    digest = hashlib.sha256()
    digest.update(images.labels.numpy().astype(np.int64).tobytes())
    digest.update(f"size={getattr(images, 'size', images.decode_size)}".encode())
    if images.in_memory and images.pixels_key is not None:
        digest.update(f"data-cache={images.pixels_key}".encode())
        return digest.hexdigest()
    if images.in_memory:
        digest.update(np.ascontiguousarray(images.images.cpu().numpy()))  # the buffer itself: no copy
        return digest.hexdigest()
    for ref in images.refs:
        if isinstance(ref, (bytes, bytearray)):
            digest.update(ref)
        elif isinstance(ref, np.ndarray):
            digest.update(np.ascontiguousarray(ref).tobytes())
        else:
            stat = Path(ref).stat()
            digest.update(f"{Path(ref).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def fingerprint(weights_digest: str, data_digest: str, inputs: TrialInputs) -> str:
    key = {"version": CACHE_VERSION, "weights": weights_digest, "data": data_digest,
           "image_size": inputs.image_size, "resize_size": inputs.resize_size,
           "mean": [round(v, 8) for v in inputs.mean], "std": [round(v, 8) for v in inputs.std]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


HEAD_BATCH = 1024  # rows of pooled features through a linear head: any batch is cheap


def forward_features(backbone: nn.Module, images: ImageSet, inputs: TrialInputs, device: torch.device) -> np.ndarray:
    """Pooled features for every image, in order, in eval mode (the batches and layout `infer` uses).
    The module is moved and re-laid-out outside inference mode: its parameters must stay trainable (LP-FT
    goes on to train the backbone whose features fitted its head)."""
    backbone = backbone.to(device).eval()
    layout = wants_channels_last(backbone, device)
    if layout:
        backbone.to(memory_format=torch.channels_last)
    autocast, _ = autocast_for(device)
    features = []
    with torch.inference_mode():
        for batch, _ in images.batches(eval_batch(device), shuffle=False, device=device):
            with autocast():
                pooled = backbone(memory_format(eval_transform(batch, inputs.image_size, inputs.mean, inputs.std),
                                                layout))
            features.append(pooled.float().cpu())
    return torch.cat(features).numpy() if features else np.zeros((0, 0), np.float32)


@torch.inference_mode()
def head_probs(source_head: nn.Module, features: np.ndarray, device: torch.device) -> np.ndarray:
    """Source-classifier probabilities (float64) from pooled features."""
    head = source_head.to(device).eval()
    rows = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    probs = [head(rows[i:i + HEAD_BATCH].to(device)).float().softmax(dim=1).cpu() for i in range(0, len(rows), HEAD_BATCH)]
    return torch.cat(probs).double().numpy() if probs else np.zeros((0, 0))


class FeatureCache:
    """`<folder>/<fingerprint>.safetensors`, written atomically; safe for concurrent readers."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> FeatureSet | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception:  # a torn or foreign file: recompute rather than fail
            return None
        return FeatureSet(tensors["features"], tensors["labels"], None, float(meta.get("seconds", "nan")), cached=True)

    def put(self, key: str, features: FeatureSet, meta: dict[str, str]) -> None:
        from safetensors.numpy import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {"features": np.ascontiguousarray(features.features, dtype=np.float32),
                   "labels": np.ascontiguousarray(features.labels, dtype=np.int64)}
        handle, staging = tempfile.mkstemp(prefix=f".{key}-", suffix=".safetensors", dir=self.folder)
        os.close(handle)
        save_file(tensors, staging, metadata={**meta, "seconds": repr(float(features.seconds))})  # exact: read back equal
        os.replace(staging, self.path(key))


def extract(backbone: nn.Module, source_head: nn.Module | None, images: ImageSet, inputs: TrialInputs,
            device: torch.device, cache: FeatureCache | None, meta: dict[str, str] | None = None,
            key: str | None = None) -> FeatureSet:
    """Features of `images` through `backbone`, from the cache when an identical pass was done before;
    `key` (from `fingerprint`) saves re-hashing weights and pixels when the caller already knows it."""
    key = key or fingerprint(tensors_digest(backbone), images_digest(images), inputs)
    result = cache.get(key) if cache is not None else None
    if result is None:
        start = time.perf_counter()
        features = forward_features(backbone, images, inputs, device)
        result = FeatureSet(features, images.labels.numpy().astype(np.int64), None, time.perf_counter() - start,
                            cached=False)
        if cache is not None:
            cache.put(key, result, {k: str(v) for k, v in (meta or {}).items()})
    if source_head is not None:
        result.source_probs = head_probs(source_head, result.features, device)
    return result
