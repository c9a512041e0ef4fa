"""Datasets: read labelled images once, keep them as uint8 tensors, augment in batches.

Images are decoded a single time per run to a square `decode_size` (resize the short side,
centre crop), so trials never re-decode JPEGs. Augmentation and normalisation run on whole
batches of tensors, on the training device.

Splits: train, val and test. The test split is fixed by the source alone (a `test/` folder, a
CSV `split=test`, the built-in digits' fixed carve, or a plugin's own), never by `--seed` or
`--val-fraction`, and it is kept apart from everything that chooses: `PreparedData.test` is
decoded like the others, but trials, pruning, pre-ranking and the choice of the best trial read
`train` and `val` only. A missing val split is carved from train (stratified, seeded).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import UserError

log = logging.getLogger(__name__)

ImageRef = Union[Path, np.ndarray, bytes]  # a file, decoded pixels (H, W[, C]) uint8, or encoded image bytes
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SPLITS = ("train", "val", "test")
BUILTIN_TEST_FRACTION = 0.2  # built-in digits: a fixed, stratified test carve ...
BUILTIN_TEST_SEED = 0        # ... the same whatever --seed, so every run and method scores the same images
TRAIN_SCALE = (0.6, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


@dataclass
class LabelledRefs:
    """Undecoded images with labels, as a dataset source returns them."""

    name: str
    refs: list[ImageRef]
    labels: np.ndarray
    class_names: list[str]
    splits: np.ndarray | None = None  # "train"/"val"/"test" per image, or None: val (and no test) split here

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.splits is not None:
            self.splits = np.asarray(self.splits)
            bad = sorted(set(self.splits.tolist()) - set(SPLITS))
            if bad:
                raise UserError(f"dataset {self.name!r}: unknown split value(s) {', '.join(map(repr, bad))}; "
                                f"a source must label each image {', '.join(SPLITS)}")

    def with_val_as_test(self) -> "LabelledRefs":
        """The source's val split becomes the test split; the search then carves its own val from train
        (for datasets that ship only train/val, like a benchmark that must keep one split unseen)."""
        if self.splits is None or not (self.splits == "val").any():
            raise UserError(f"dataset {self.name!r} has no val split to hold out as test; "
                            "drop --val-as-test or give a dataset with a val split")
        if (self.splits == "test").any():
            raise UserError(f"dataset {self.name!r} already has a test split; drop --val-as-test")
        return LabelledRefs(self.name, self.refs, self.labels, self.class_names,
                            np.where(self.splits == "val", "test", self.splits))

    def split_refs(self, split: str) -> tuple[list[ImageRef], np.ndarray]:
        """The undecoded images and labels of one source-defined split (empty when there is none)."""
        if self.splits is None:
            return [], np.zeros(0, dtype=np.int64)
        rows = np.flatnonzero(self.splits == split)
        return [self.refs[i] for i in rows], self.labels[rows]


def from_torch_dataset(dataset, name: str) -> LabelledRefs:
    """A map-style torch Dataset of (image, label) pairs, as a source may return one.

    Images may be PIL images, uint8 arrays (H, W[, C]) or tensors (C, H, W), uint8 or float in
    [0, 1]; class names come from `dataset.classes` when it has them. Every item is read once here,
    so the dataset's own transforms should not augment.
    """
    from PIL import Image as PILImage

    refs, labels = [], []
    for index in range(len(dataset)):
        image, label = dataset[index]
        if isinstance(image, PILImage.Image):
            array = np.asarray(_to_rgb(image), dtype=np.uint8)
        elif isinstance(image, torch.Tensor):
            tensor = image.detach().cpu()
            if tensor.is_floating_point():
                tensor = (tensor.clamp(0, 1) * 255).round()
            array = tensor.to(torch.uint8).numpy()
            array = array.transpose(1, 2, 0) if array.ndim == 3 else array
        else:
            array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise UserError(f"dataset {name!r}: item {index} is {type(image).__name__} of shape {array.shape}, "
                            f"dtype {array.dtype}; return PIL images, uint8 arrays or (C, H, W) tensors")
        refs.append(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
        labels.append(int(label))
    classes = getattr(dataset, "classes", None)
    class_names = [str(c) for c in classes] if classes is not None else [str(c) for c in sorted(set(labels))]
    if classes is None:
        remap = {label: i for i, label in enumerate(sorted(set(labels)))}
        labels = [remap[label] for label in labels]
    return LabelledRefs(name, refs, np.array(labels), class_names)


def load_dataset(source, uri: str) -> LabelledRefs:
    """Ask `source` for `uri`; a torch Dataset is read into LabelledRefs."""
    loaded = source.load(uri)
    if isinstance(loaded, LabelledRefs):
        return loaded
    if isinstance(loaded, torch.utils.data.Dataset) and hasattr(loaded, "__len__"):
        return from_torch_dataset(loaded, getattr(loaded, "name", None) or uri)
    raise UserError(f"dataset source {source.name!r} returned {type(loaded).__name__} for {uri!r}; "
                    "a source must return autotransfer.data.LabelledRefs or a map-style torch Dataset")


# --------------------------------------------------------------------------- sources

class FolderSource:
    """ImageFolder layout: `root/train/<class>/*` with optional `root/val/` and `root/test/` beside it,
    or `root/<class>/*`. Without val/, val is carved from train; test/ is never carved."""

    name = "folder"

    def can_load(self, uri: str) -> bool:
        return Path(uri).is_dir()

    def load(self, uri: str) -> LabelledRefs:
        root = Path(uri)
        split_dirs = _split_dirs(root)
        if split_dirs:
            parts = {split: _scan_classes(path) for split, path in split_dirs.items()}
            class_names = sorted(set().union(*parts.values()))
        else:
            parts = {None: _scan_classes(root)}
            class_names = sorted(parts[None])
        if not class_names:
            raise UserError(
                f"no class folders in {root}; expected {root}/<class>/<image> or "
                f"{root}/train/<class>/<image> (with val/ and test/ beside train/ when you have them)")
        index = {name: i for i, name in enumerate(class_names)}
        refs, labels, splits = [], [], []
        for split, classes in parts.items():
            for class_name, files in classes.items():
                refs += files
                labels += [index[class_name]] * len(files)
                splits += [split] * len(files)
        if not refs:
            raise UserError(f"no files found under {root}; put images in one folder per class")
        return LabelledRefs(root.name, refs, np.array(labels), class_names,
                            None if None in parts else np.array(splits))


def _split_dirs(root: Path) -> dict[str, Path]:
    """`train/` (+ `val/`, `valid/`, `validation/`, `test/`) at the top of `root`, or {} for a class layout.
    Any other folder beside train/ is an error, not a class; so is a split folder without train/."""
    folders = _subdirs(root)
    named = {p.name.lower(): p for p in folders if p.name.lower() in SPLIT_NAMES}
    if "train" not in named:
        if named:
            found = ", ".join(f"{p.name}/" for p in named.values())
            raise UserError(f"{root} has {found} but no train/ beside it; a split layout needs train/ "
                            "(rename the folder if it is a class)")
        return {}
    stray = [p.name for p in folders if p.name.lower() not in SPLIT_NAMES]
    if stray:
        raise UserError(f"{root} has a folder {stray[0]!r} beside train/; only train/, val/ (or valid/, validation/) "
                        f"and test/ may stand there: move {stray[0]!r} inside a split or out of {root}")
    splits: dict[str, Path] = {}
    for key, path in sorted(named.items()):
        split = SPLIT_NAMES[key]
        if split in splits:
            raise UserError(f"{root} has both {splits[split].name}/ and {path.name}/; keep one {split} folder")
        splits[split] = path
    return splits


class CsvSource:
    """A CSV manifest with columns `path,label` (paths relative to the CSV), optionally `split`."""

    name = "csv"

    def can_load(self, uri: str) -> bool:
        return uri.lower().endswith(".csv") and Path(uri).is_file()

    def load(self, uri: str) -> LabelledRefs:
        path = Path(uri)
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[:exc.start].count(b"\n") + 1
            raise UserError(f"CSV manifest {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
                            "save it as UTF-8") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise UserError(
                f"CSV manifest {path} lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'}); "
                "its header must be path,label[,split]")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
        if not rows:
            raise UserError(f"CSV manifest {path} has a header but no rows")
        class_names = sorted({row["label"] for row in rows})
        index = {name: i for i, name in enumerate(class_names)}
        refs = [(path.parent / row["path"]) for row in rows]
        labels = np.array([index[row["label"]] for row in rows])
        splits = None
        if "split" in columns:
            bad = sorted({row["split"] for row in rows if row["split"].lower() not in SPLIT_NAMES})
            if bad:
                raise UserError(f"CSV manifest {path}: unknown split value(s) {', '.join(map(repr, bad))}; "
                                "use train, val or test")
            splits = np.array([SPLIT_NAMES[row["split"].lower()] for row in rows])
        return LabelledRefs(path.stem, refs, labels, class_names, splits)


class BuiltinSource:
    """`builtin:digits`: scikit-learn's bundled 8x8 digits, so demos and tests need no files.

    `builtin:digits:0-4` (or `:5,7,9`) keeps only those classes, which gives disjoint source and
    target tasks for a two-phase transfer demo: pretrain on one half, search on the other.
    """

    name = "builtin"
    datasets = ("digits", "digits:LOW-HIGH")

    def can_load(self, uri: str) -> bool:
        return uri.startswith("builtin:")

    def load(self, uri: str) -> LabelledRefs:
        key, _, subset = uri.split(":", 1)[1].partition(":")
        if key != "digits":
            raise UserError(f"unknown built-in dataset {uri!r}; available: builtin:digits, builtin:digits:0-4")
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        names = [str(c) for c in digits.target_names]
        keep = _digit_subset(uri, subset) if subset else list(range(len(names)))
        rows = np.isin(digits.target, keep)
        remap = {old: new for new, old in enumerate(keep)}
        labels = np.array([remap[t] for t in digits.target[rows]])
        name = "digits" if not subset else f"digits-{subset.replace(',', '_')}"
        return LabelledRefs(name, list(images[rows]), labels, [names[k] for k in keep], _fixed_test_carve(labels))


def _fixed_test_carve(labels: np.ndarray) -> np.ndarray:
    """"test" for a stratified BUILTIN_TEST_FRACTION of the images, "train" for the rest; the same for
    every run (its seed is fixed, not --seed), so val is carved from the rest and test stays unseen."""
    from sklearn.model_selection import train_test_split

    _, test_index = train_test_split(np.arange(len(labels)), test_size=BUILTIN_TEST_FRACTION, stratify=labels,
                                     random_state=BUILTIN_TEST_SEED)
    splits = np.full(len(labels), "train", dtype=object)
    splits[test_index] = "test"
    return splits


def _digit_subset(uri: str, spec: str) -> list[int]:
    try:
        if "-" in spec:
            low, high = (int(v) for v in spec.split("-"))
            keep = list(range(low, high + 1))
        else:
            keep = sorted({int(v) for v in spec.split(",")})
    except ValueError:
        keep = []
    if len(keep) < 2 or not all(0 <= k <= 9 for k in keep):
        raise UserError(f"{uri!r}: the class subset must be LOW-HIGH or a comma list of at least two digits 0-9, "
                        "e.g. builtin:digits:0-4")
    return keep


def _subdirs(path: Path) -> list[Path]:
    """Visible sub-folders; a link back to `path` or above it (`ln -s . data/loop`) is skipped with a warning,
    since it would make a class of every image again."""
    folders = []
    for p in sorted(path.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if p.is_symlink() and _loops_back(p, path):
            log.warning("skipped folder %s: a link back to %s, not a class", p, p.resolve())
            continue
        folders.append(p)
    return folders


def _loops_back(link: Path, parent: Path) -> bool:
    target, here = link.resolve(), parent.resolve()
    return target == here or target in here.parents


def _scan_classes(root: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
            for d in _subdirs(root)}


# --------------------------------------------------------------------------- decoding

def decode_image(ref: ImageRef, size: int) -> torch.Tensor:
    """Decode to RGB, resize the short side to `size` and centre crop: uint8 (3, size, size)."""
    if isinstance(ref, np.ndarray):
        image = Image.fromarray(ref)
    else:
        image = Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref)
        image.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
    image = _to_rgb(image)
    image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):  # 16-bit grey: scale to 8 bits (convert() clips nearly all to white)
        grey = np.asarray(image).astype(np.float32) / 257.0
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


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


def _try_decode(ref: ImageRef, size: int) -> torch.Tensor | None:
    try:
        return decode_image(ref, size)
    except Image.DecompressionBombError as exc:  # skipped like any unreadable file, but say why
        log.warning("skipped %s: %s (PIL refuses images past Image.MAX_IMAGE_PIXELS = %s as a possible "
                    "decompression bomb; raise that limit only for images you trust)", _describe(ref),
                    str(exc).split(" could be")[0], Image.MAX_IMAGE_PIXELS)
        return None
    except Exception:  # unreadable or not an image: counted and reported once by the caller
        return None


def _try_verify(ref: ImageRef) -> bool:
    """Whether a file decodes, checked cheaply (small size, JPEGs at reduced scale). `verify()` alone
    passes truncated JPEGs, which then crash a DataLoader worker mid-epoch instead of being skipped."""
    return _try_decode(ref, 32) is not None


def _describe(ref: ImageRef) -> str:
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


# --------------------------------------------------------------------------- image sets

@dataclass
class ImageSet:
    """Labelled images of one split: decoded in memory, or streamed from files by workers."""

    labels: torch.Tensor
    images: torch.Tensor | None = None          # uint8 (N, 3, S, S) when cached
    refs: list[ImageRef] | None = None          # when streamed
    decode_size: int = 0
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
        return ImageSet(self.labels.to(device), images=self.images.to(device), decode_size=self.decode_size)

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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to `device` without making the host wait: host tensors bound for CUDA go through pinned
    memory so the copy is asynchronous (a pageable copy would synchronise the stream)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


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
            memory_budget: int | None = None) -> PreparedData:
    """Decode once, drop unreadable files (one warning), split and validate the classes."""
    budget = memory_budget_bytes() if memory_budget is None else memory_budget
    n = len(refs.refs)
    if n == 0:
        raise UserError(f"dataset {refs.name!r} holds no images")
    fits = n * 3 * decode_size * decode_size <= budget
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        if fits:
            decoded = list(pool.map(lambda r: _try_decode(r, decode_size), refs.refs, chunksize=16))
            ok = np.array([t is not None for t in decoded])
        else:
            log.warning("%d images at %dpx exceed the %.1f GB cache budget; decoding them every epoch with workers",
                        n, decode_size, budget / 2**30)
            ok = np.array(list(pool.map(_try_verify, refs.refs, chunksize=16)))
    skipped = [_describe(r) for r, good in zip(refs.refs, ok) if not good]
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

    def subset(split: str) -> ImageSet:
        rows = keep[splits == split]
        label_tensor = torch.as_tensor(refs.labels[rows])
        if fits:
            return ImageSet(label_tensor, images=torch.stack([decoded[i] for i in rows]) if len(rows) else
                            torch.empty((0, 3, decode_size, decode_size), dtype=torch.uint8), decode_size=decode_size)
        return StreamedView(ImageSet(label_tensor, refs=[refs.refs[i] for i in rows], decode_size=decode_size), decode_size)

    test = subset("test") if (splits == "test").any() else None
    return PreparedData(refs.name, refs.class_names, subset("train"), subset("val"), decode_size, skipped, test)


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
