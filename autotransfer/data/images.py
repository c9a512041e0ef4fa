"""Decoded images in memory and the splits a search reads: `prepare` decodes a dataset once into
`PreparedData` (train, val and the held-out test), carving val from train when the source has none.

`PreparedData.test` is decoded like the others, but trials, pruning, pre-ranking and the choice of the
best trial read `train` and `val` only.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from ..devices import to_device
from ..errors import UserError
from .sources import LabelledRefs
from .decode import ImageRef, decode_image, describe_ref, memory_budget_bytes, resize_square, try_decode, try_verify

if TYPE_CHECKING:
    from .pixels import PixelCache

log = logging.getLogger(__package__)  # "autotransfer.data", as when this package was one module


# --------------------------------------------------------------------------- image sets

@dataclass
class ImageSet:
    """Labelled images of one split: decoded in memory, or streamed from files by workers."""

    labels: torch.Tensor
    images: torch.Tensor | None = None          # uint8 (N, 3, S, S) when cached
    refs: list[ImageRef] | None = None          # when streamed
    decode_size: int = 0
    pixels_key: str | None = None  # names these pixels when they are a slice of a data cache entry (pixels.py)
    _resized: dict[int, "ImageSet"] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def at_size(self, size: int) -> "ImageSet":
        """The same images at another square size, derived from the decoded tensors (cached)."""
        if size == self.decode_size:
            return self
        if size not in self._resized:
            if self.in_memory:
                self._resized[size] = ImageSet(self.labels, images=resize_square(self.images, size), decode_size=size)
            else:
                self._resized[size] = StreamedView(self, size)
        return self._resized[size]

    def to(self, device: torch.device) -> "ImageSet":
        """Keep cached images resident on the training device (uint8, so 4x smaller than floats)."""
        if not self.in_memory or self.images.device == device:
            return self
        return ImageSet(self.labels.to(device), images=self.images.to(device), decode_size=self.decode_size,
                        pixels_key=self.pixels_key)

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, labels); a final batch of one is dropped in training (BatchNorm)."""
        for index in batch_order(len(self), batch_size, shuffle=shuffle, generator=generator,
                                 device=self.images.device):
            images, labels = self.images[index], self.labels[index]
            if device is not None:
                images, labels = to_device(images, device), to_device(labels, device)
            yield images, labels


def batch_order(n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """Index batches over n examples; one shuffle per call, and a final training batch of one is
    dropped (BatchNorm). Every trial path draws its order here, so the same seed gives the same
    batches whether a trial trains on images, cached features or cached activations."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if device is not None:
        order = to_device(order, torch.device(device))
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        if shuffle and len(index) < 2:
            break
        yield index


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, refs: Sequence[ImageRef], labels: torch.Tensor, decode_size: int, size: int):
        self.refs, self.labels, self.decode_size, self.size = refs, labels, decode_size, size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        image = decode_image(self.refs[i], self.decode_size)
        if self.size != self.decode_size:
            image = resize_square(image[None], self.size)[0]
        return image, self.labels[i]


class StreamedView(ImageSet):
    """Images too large to cache: worker processes decode them every epoch."""

    def __init__(self, base: ImageSet, size: int):
        super().__init__(labels=base.labels, refs=base.refs, decode_size=base.decode_size)
        self.size = size

    def batches(self, batch_size, *, shuffle, generator=None, device=None):
        dataset = _DecodeDataset(self.refs, self.labels, self.decode_size, self.size)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
            num_workers=min(8, os.cpu_count() or 1), drop_last=False,
            pin_memory=device is not None and device.type == "cuda", persistent_workers=False)
        for images, labels in loader:
            if shuffle and len(labels) < 2:
                break
            if device is not None:
                images, labels = to_device(images, device), to_device(labels, device)
            yield images, labels


@dataclass
class PreparedData:
    """Decoded splits. `test` (None when the dataset has none) is for scoring a chosen model only:
    nothing that trains, validates, prunes, pre-ranks or chooses reads it."""

    name: str
    class_names: list[str]
    train: ImageSet
    val: ImageSet
    decode_size: int
    skipped: list[str]
    test: ImageSet | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def prepare(refs: LabelledRefs, decode_size: int, *, val_fraction: float, seed: int,
            memory_budget: int | None = None, cache: "PixelCache | None" = None,
            say: Callable[[str], None] = lambda message: None) -> PreparedData:
    """Decode once, drop unreadable files (one warning), split and validate the classes. With `cache`
    the pixels come from (or go into) the on-disk data cache, memory-mapped and shared between
    processes; the splits are views of its file, never copies in this process."""
    budget = memory_budget_bytes() if memory_budget is None else memory_budget
    n = len(refs.refs)
    if n == 0:
        raise UserError(f"dataset {refs.name!r} holds no images")
    fits = n * 3 * decode_size * decode_size <= budget
    found = None
    if fits and cache is not None:
        found = cache.open_or_build(refs.refs, decode_size, say=say, what=refs.name)
        ok = found.ok
    else:
        say(f"decoding {n} images of {refs.name} at {decode_size} px")
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
            if fits:
                decoded = list(pool.map(lambda r: try_decode(r, decode_size), refs.refs, chunksize=16))
                ok = np.array([t is not None for t in decoded])
            else:
                log.warning("%d images at %dpx exceed the %.1f GB cache budget; decoding them every epoch with "
                            "workers", n, decode_size, budget / 2**30)
                ok = np.array(list(pool.map(try_verify, refs.refs, chunksize=16)))
    skipped = [describe_ref(r) for r, good in zip(refs.refs, ok) if not good]
    if skipped:
        examples = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        log.warning("skipped %d unreadable or non-image file(s): %s", len(skipped), examples)
    if not ok.any():
        raise UserError(f"dataset {refs.name!r} has no readable images ({n} files tried); check the path and formats")
    keep = np.flatnonzero(ok)
    labels = refs.labels[keep]
    carve_val = refs.splits is None or not (refs.splits == "val").any()  # what the source gave, before skips
    splits = assign_splits(labels, None if refs.splits is None else refs.splits[keep], refs.class_names,
                           val_fraction, seed, refs.name, carve_val=carve_val)
    _check_classes(labels, splits, refs.class_names, refs.name)
    names = ["train", "val"] + (["test"] if (splits == "test").any() else [])
    rows = {name: keep[splits == name] for name in names}
    views = _cached_views(cache, found, rows, decode_size) if found is not None else {}

    def subset(split: str) -> ImageSet:
        label_tensor = torch.as_tensor(refs.labels[rows[split]])
        if split in views:
            key, images = views[split]
            return ImageSet(label_tensor, images=images, decode_size=decode_size, pixels_key=key)
        if fits:
            images = (torch.stack([decoded[i] for i in rows[split]]) if len(rows[split]) else
                      torch.empty((0, 3, decode_size, decode_size), dtype=torch.uint8))
            return ImageSet(label_tensor, images=images, decode_size=decode_size)
        return StreamedView(ImageSet(label_tensor, refs=[refs.refs[i] for i in rows[split]],
                                     decode_size=decode_size), decode_size)

    test = subset("test") if "test" in names else None
    return PreparedData(refs.name, refs.class_names, subset("train"), subset("val"), decode_size, skipped, test)


def _cached_views(cache: "PixelCache", found, rows: dict[str, np.ndarray],
                  decode_size: int) -> dict[str, tuple[str, torch.Tensor]]:
    """Each split's pixels as a slice of one mapped file, with a key naming that slice: of the entry
    itself when every split's images lie contiguous and in order there (folders per split), else of a
    copy in split order, kept in the cache too (val carved from train), so processes share it too."""
    position = np.cumsum(found.ok) - 1  # ref index -> row of the entry's pixels
    at = {name: position[index] for name, index in rows.items()}
    if all(len(p) == 0 or (p[-1] - p[0] + 1 == len(p) and (np.diff(p) == 1).all()) for p in at.values()):
        starts = {name: int(p[0]) if len(p) else 0 for name, p in at.items()}
        return {name: (f"{found.key}[{starts[name]}:{starts[name] + len(p)}]",
                       found.pixels[starts[name]:starts[name] + len(p)]) for name, p in at.items()}
    order = np.concatenate([at[name] for name in rows])
    key, pixels = cache.derived(found, order, decode_size)
    bounds = np.cumsum([0] + [len(at[name]) for name in rows])
    return {name: (f"{key}[{bounds[i]}:{bounds[i + 1]}]", pixels[bounds[i]:bounds[i + 1]])
            for i, name in enumerate(rows)}


def assign_splits(labels: np.ndarray, given: np.ndarray | None, class_names: list[str], val_fraction: float,
                  seed: int, name: str, *, carve_val: bool = True) -> np.ndarray:
    """Every image's split: the source's own, with val carved from train (stratified, seeded) when the
    source gave none. Test images are never moved: the test split depends on the source alone."""
    if given is None:
        return _stratified_split(labels, class_names, val_fraction, seed, name)
    splits = np.asarray(given, dtype=object).copy()
    if carve_val:
        train = np.flatnonzero(splits == "train")
        if len(train):
            splits[train] = _stratified_split(labels[train], class_names, val_fraction, seed, name)
    return splits


def _stratified_split(labels: np.ndarray, class_names: list[str], val_fraction: float, seed: int,
                      name: str) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels, minlength=len(class_names))
    if (counts == 1).any():
        lonely = class_names[int(np.flatnonzero(counts == 1)[0])]
        raise UserError(f"class {lonely!r} has a single readable image; a train/val split needs at least 2 per class")
    if len(np.flatnonzero(counts)) < 2:
        _check_classes(labels, np.array(["train"] * len(labels)), class_names, name)
    index = np.arange(len(labels))
    present = len(np.flatnonzero(counts))
    val_size = max(int(math.ceil(val_fraction * len(labels))), present)
    if len(labels) - val_size < present:  # a stratified split needs a training image per class
        raise UserError(f"--val-fraction {val_fraction} leaves {max(0, len(labels) - val_size)} training image(s) "
                        f"for {present} classes; lower it")
    _, val_index = train_test_split(index, test_size=val_size, stratify=labels, random_state=seed)
    splits = np.full(len(labels), "train", dtype=object)
    splits[val_index] = "val"
    return splits


def _check_classes(labels: np.ndarray, splits: np.ndarray, class_names: list[str], name: str) -> None:
    present = np.unique(labels)
    if len(present) < 2:
        only = repr(class_names[int(present[0])]) if len(present) else "none"
        raise UserError(f"dataset {name!r} has a single class ({only}); transfer learning needs at least 2 classes")
    train_classes = set(np.unique(labels[splits == "train"]).tolist())
    missing = [class_names[i] for i in present if i not in train_classes]
    if missing:
        raise UserError(f"class(es) {', '.join(missing)} of dataset {name!r} have no training images; "
                        "add some to the train split")
    if not (splits == "val").any():
        raise UserError(f"dataset {name!r} has no validation images; add a val split or use --val-fraction")
