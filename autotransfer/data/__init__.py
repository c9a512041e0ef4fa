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

from .sources import (
    BUILTIN_TEST_FRACTION, BUILTIN_TEST_SEED, BuiltinSource, CsvSource, DatasetSource, FolderSource, LabelledRefs,
    SPLITS, SPLIT_NAMES, from_torch_dataset, load_dataset)
from .decode import (
    ImageRef, decode_image, describe_ref, memory_budget_bytes, native_size, resize_square, to_rgb,
    try_decode, try_verify)
from .images import ImageSet, PreparedData, StreamedView, assign_splits, batch_order, prepare, to_device
from .pixels import PixelCache, default_folder as default_data_cache
from .transforms import TRAIN_RATIO, TRAIN_SCALE, centre_crop, eval_transform, normalise, train_transform

__all__ = [
    "BUILTIN_TEST_FRACTION", "BUILTIN_TEST_SEED", "BuiltinSource", "CsvSource", "DatasetSource", "FolderSource",
    "ImageRef", "ImageSet", "LabelledRefs", "PixelCache", "PreparedData", "SPLITS", "SPLIT_NAMES", "StreamedView",
    "TRAIN_RATIO", "TRAIN_SCALE", "assign_splits", "batch_order", "centre_crop", "decode_image",
    "default_data_cache", "describe_ref", "eval_transform", "from_torch_dataset", "load_dataset", "memory_budget_bytes",
    "native_size", "normalise", "prepare", "resize_square", "to_device", "to_rgb", "train_transform",
    "try_decode", "try_verify"]
