"""Datasets: read labelled images once, keep them as uint8 tensors, augment in batches.

- `sources`: where labelled images come from (`LabelledRefs`; image folders, CSV manifests, the built-in
  digits, torch Datasets) and the `DatasetSource` protocol a plugin's source follows;
- `decode`: every image read once, converted to RGB, resized and centre-cropped to a square (uint8);
- `images`: the decoded splits in memory (`ImageSet`, `PreparedData`) and `prepare`, which makes them;
- `pixels`: the decoded-image cache on disk (`PixelCache`), written once per machine and memory-mapped
  by every process that reads the same images at the same size;
- `transforms`: augmentation and normalisation on whole batches, on the training device.

Images are decoded a single time per run to a square `decode_size`, so trials never re-decode JPEGs.
The test split is fixed by the source alone and kept apart from everything that chooses: trials,
pruning, pre-ranking and the choice of the best trial read `train` and `val` only. A missing val
split is carved from train (stratified, seeded).

Every public name of the parts is importable from here (`from autotransfer.data import LabelledRefs`),
as it was when this was one module.
"""

import importlib
from typing import TYPE_CHECKING

# Each public name and the part it lives in. They load on first use (PEP 562), so registering the
# built-in sources (the `plugins` command, a plugin's import) does not import torch.
_PARTS = {
    "sources": ("BUILTIN_TEST_FRACTION", "BUILTIN_TEST_SEED", "BuiltinSource", "CsvSource", "DatasetSource",
                "FolderSource", "ImageRef", "LabelledRefs", "SPLITS", "SPLIT_NAMES", "from_torch_dataset",
                "load_dataset", "to_rgb"),
    "decode": ("decode_image", "describe_ref", "memory_budget_bytes", "native_size", "resize_square",
               "try_decode", "try_verify"),
    "images": ("ImageSet", "PreparedData", "StreamedView", "assign_splits", "batch_order", "prepare", "to_device"),
    "pixels": ("PixelCache", "default_data_cache"),
    "transforms": ("TRAIN_RATIO", "TRAIN_SCALE", "centre_crop", "eval_transform", "normalise", "train_transform"),
}
_RENAMED = {"default_data_cache": "default_folder"}
_WHERE = {name: part for part, names in _PARTS.items() for name in names}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:
    from .decode import (decode_image, describe_ref, memory_budget_bytes, native_size, resize_square, try_decode,
                         try_verify)
    from .images import ImageSet, PreparedData, StreamedView, assign_splits, batch_order, prepare, to_device
    from .pixels import PixelCache, default_folder as default_data_cache
    from .sources import (BUILTIN_TEST_FRACTION, BUILTIN_TEST_SEED, BuiltinSource, CsvSource, DatasetSource,
                          FolderSource, ImageRef, LabelledRefs, SPLITS, SPLIT_NAMES, from_torch_dataset, load_dataset,
                          to_rgb)
    from .transforms import TRAIN_RATIO, TRAIN_SCALE, centre_crop, eval_transform, normalise, train_transform

__all__ = [
    "BUILTIN_TEST_FRACTION", "BUILTIN_TEST_SEED", "BuiltinSource", "CsvSource", "DatasetSource", "FolderSource",
    "ImageRef", "ImageSet", "LabelledRefs", "PixelCache", "PreparedData", "SPLITS", "SPLIT_NAMES", "StreamedView",
    "TRAIN_RATIO", "TRAIN_SCALE", "assign_splits", "batch_order", "centre_crop", "decode_image",
    "default_data_cache", "describe_ref", "eval_transform", "from_torch_dataset", "load_dataset", "memory_budget_bytes",
    "native_size", "normalise", "prepare", "resize_square", "to_device", "to_rgb", "train_transform",
    "try_decode", "try_verify"]
